"""Triton Python-backend model: one FSSAM episode, composed by fssam.runtime.contract over BLS calls
to the stage models, with an LRU cache of encoded support sets. Written by `fssam repository`."""

from fssam.serving.pipeline import TritonPythonModel  # noqa: F401
