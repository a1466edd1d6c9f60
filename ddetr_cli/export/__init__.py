"""Exports of a trained model: ONNX (:mod:`.onnx`), checked by onnxruntime after writing."""

from .onnx import DEFAULT_OPSET, MIN_SIDE, TOLERANCE, ExportError, VerifyResult, export_onnx, read_metadata, verify_onnx

__all__ = ["DEFAULT_OPSET", "MIN_SIDE", "TOLERANCE", "ExportError", "VerifyResult", "export_onnx", "read_metadata",
           "verify_onnx"]
