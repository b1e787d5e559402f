"""The outputs: the on-disk format and its registry, deployment (model cards, HF ONNX layout, OpenVINO), compiled
PyTorch."""
