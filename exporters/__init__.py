"""Writers for baked models: timm local-dir, safetensors metadata, ONNX (and other libraries' folders)."""
