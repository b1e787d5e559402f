"""ONNX: export (float, INT8), ONNX files as input (graph rewrite, hub variants, VLM vision encoders), the
hostile-file pre-scan."""
