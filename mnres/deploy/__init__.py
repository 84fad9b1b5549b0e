"""Deployment: export (StableHLO, TFLite, ONNX) and prediction on image files."""
