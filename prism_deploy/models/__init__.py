"""Models A and B around an adapter: export to ONNX, paired activations for fitting."""
