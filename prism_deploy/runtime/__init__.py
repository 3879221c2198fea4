"""Runtime layer: running lowered graphs and built engines (ONNX Runtime, TensorRT)."""
