"""Writing outputs so that nothing half-written is ever left at the destination."""

from __future__ import annotations

import os
import shutil
import tempfile


def replace_folder(tmp: str, out: str) -> None:
    """Move a finished temporary folder to `out` (same file system), replacing an earlier one there."""
    if os.path.exists(out):
        backup = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(out))
        os.rename(out, os.path.join(backup, "previous"))
        os.rename(tmp, out)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(tmp, out)
