"""Serving FSSAM with NVIDIA Triton Inference Server: model repository, server, client, deploy.

* `fssam.serving.repository.write_repository`: a Triton model repository from an export folder
  (the two deployable graphs, a mask-validation step and the `fssam` ensemble; Triton's response
  cache on support_encoder is the support-set cache).
* `fssam.serving.server.TritonServer`: start / wait for / stop a real `tritonserver`.
* `fssam.serving.client.predict_remote`: one episode through a running server.
* The `repository`, `serve` and `deploy` sub-commands are in fssam.commands.
"""

from fssam.errors import FSSAMError

ENSEMBLE_MODEL = "fssam"  # the model clients call
WEIGHTS_PARAMETER = "fssam_weights"  # the ensemble's config parameter naming the weights it serves
DEFAULT_CACHE_MB = 256  # Triton's local response cache (the support-set cache) of fssam serve / deploy / bench


class ServingError(FSSAMError):
    """The Triton server could not be started, reached, or answered with an error."""
