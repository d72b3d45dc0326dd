"""One module per runtime; each defines RUNNER (a fssam.runtime.runner.StageRunner) and PRECISIONS."""
