"""The precision of an ONNX ViT graph (fp32, fp16, dynamic INT8, 4-bit) and the check tolerance that fits it.

Read from the graph: the MLP projections' storage (`linear.py`) and the residual stream's dtype
(`TokenLayout.dtype`). Tolerances are the relative error allowed against the hooked reference written into
the file's own source graph (measured on the organisms: fp16 ~2e-4, INT8 and 4-bit ~1e-7, as fp32).
"""
from __future__ import annotations

import numpy as np

from ..core.output_format import FP32_TOLERANCE
from .discover import TokenLayout
from .recognise import VitGraph

TOLERANCES = {"fp32": FP32_TOLERANCE, "fp16": 3e-3, "int8": 1e-3, "q4": 1e-4, "q4f16": 3e-3, "int8f16": 3e-3}


def precision_of(vit: VitGraph, layout: TokenLayout) -> str:
    """fp32 | fp16 | int8 | q4 (| q4f16 / int8f16: quantized weights in a float16 graph)."""
    kinds = {lin.kind for s in vit.mlps for lin in s.projections}
    half = np.dtype(layout.dtype) == np.float16
    quant = "q4" if "nbits" in kinds else "int8" if "int8" in kinds else ""
    if quant:
        return quant + ("f16" if half else "")
    return "fp16" if half else "fp32"


def tolerance_for(precision: str, requested: float = FP32_TOLERANCE) -> float:
    """`requested` (the CLI's --tolerance) for fp32; at least the precision's own tolerance otherwise."""
    return requested if precision == "fp32" else max(requested, TOLERANCES.get(precision, 3e-3))
