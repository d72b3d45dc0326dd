"""Per-stage export: ONNX files, a manifest, the parity gate, OpenVINO plans and TensorRT engines."""

from fssam.export.onnx_export import ExportError, export
from fssam.runtime.manifest import load_manifest
from fssam.runtime.parity import ParityError, format_report, parity_report

__all__ = ["export", "load_manifest", "parity_report", "format_report", "ExportError", "ParityError"]
