"""Test-time registers on an ONNX file alone: recognise the ViT in the graph, find register neurons with
onnxruntime, bake them in with onnx-ir, check against a hooked reference written into the source graph."""
from .check import check_onnx, hooked_reference_graph
from .convert import convert_onnx
from .discover import find_register_neurons_onnx
from .recognise import recognise

__all__ = ["check_onnx", "convert_onnx", "find_register_neurons_onnx", "hooked_reference_graph", "recognise"]
