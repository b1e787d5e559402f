"""The outputs in the clients people use: transformers, open_clip, timm's own model tests, onnxruntime versions,
transformers.js."""
