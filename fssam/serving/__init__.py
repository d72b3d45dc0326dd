"""Serving FSSAM with NVIDIA Triton Inference Server: model repository, server, client, deploy.

* `fssam.serving.repository.write_repository`: a Triton model repository from an export folder
  (one model per stage + a Python-backend BLS pipeline with a support-set cache).
* `fssam.serving.server.TritonServer`: start / wait for / stop a real `tritonserver`.
* `fssam.serving.client.predict_remote`: one episode through a running server.
* `fssam.serving.commands.register`: the `repository`, `serve` and `deploy` sub-commands.
"""

from fssam.errors import FSSAMError

PIPELINE_MODEL = "fssam_pipeline"


class ServingError(FSSAMError):
    """The Triton server could not be started, reached, or answered with an error."""
