"""Per-stage export: ONNX files, a manifest, the parity gate, TensorRT engines on a GPU."""

from fssam.export.manifest import load_manifest
from fssam.export.onnx_export import ExportError, export
from fssam.export.parity import ParityError, format_report, parity_report
from fssam.export.runtime import OnnxStages

__all__ = ["export", "load_manifest", "OnnxStages", "parity_report", "format_report", "ExportError", "ParityError"]
