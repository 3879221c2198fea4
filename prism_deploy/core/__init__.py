"""Shared by every layer, importing none of them: errors, safe file writes, matrix files, ONNX
saving and sessions, and the one home of each cross-cutting concept (precision, targets,
tolerances, metrics, tile layout)."""
