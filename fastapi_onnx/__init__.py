"""Deployable: the HTTP inference service on ONNX Runtime (no torch installed)."""
