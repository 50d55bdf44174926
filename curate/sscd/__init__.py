"""SSCD copy-detection embeddings: loading Meta's TorchScript files or ONNX exports, and their preprocessing."""
