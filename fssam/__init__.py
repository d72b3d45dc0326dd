"""fssam: FSSAM few-shot segmentation (SAM 2 + DINOv2), exported, served and measured."""

from fssam.errors import CheckpointError, ConfigError, DataError, FSSAMError, InputError

__version__ = "0.1.0"
__all__ = ["FSSAMError", "ConfigError", "CheckpointError", "InputError", "DataError", "__version__"]
