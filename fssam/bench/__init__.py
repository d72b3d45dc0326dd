"""Benchmarks: every backend against eager PyTorch on the same inputs."""
