"""The register units' activation, recomputed in float32 for the bake's branch and for the check's hooks.

The k register units' pre-activations are gathered from the MLP's own fc1 output (so they are the very
values the source graph computes, in every precision variant) and the GELU is rewritten in float32 with a
sigmoid that stays accurate in the far negative tail: `sigmoid(t) = 1 / (1 + e)` for t >= 0 and
`e / (1 + e)` otherwise, `e = exp(-|t|)`. QuickGELU is `z * sigmoid(alpha z)`, tanh GELU
`z * sigmoid(2 sqrt(2/pi) (z + 0.044715 z^3))` (the same function: 1 + tanh(u) = 2 sigmoid(2u)), erf GELU
`0.5 z (1 + erf(z / sqrt 2))`, SiLU `z * sigmoid(z)`. A gated MLP's unit is `act(gate_u) * value_u`: both
gathered from the source's own tensors, the product taken in float32. Why: the register row is the signed max of these units over the image,
which can sit in the activation's tail where `1 + tanh(u)` cancels and a saturating float32 Sigmoid kernel
is relatively far off. The earlier float64 branch fixed that too, but onnxruntime fuses a float64
x * sigmoid(1.702 x) into com.microsoft.QuickGelu, which has float kernels only (1.30 cannot load it at
optimisation level EXTENDED / ALL), and float16 graphs need a float32 path anyway. Nothing here matches a
fusion pattern, so every runtime runs it as written.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir

from ..core.activations import QUICK_GELU_ALPHA, SIGMOID_GATES
from .recognise import MlpSite
from .values import const_array

COMPUTE_DTYPE = np.float32


def _alpha(site: MlpSite) -> float:
    for n in site.act_nodes:
        if n.op_type == "QuickGelu":
            a = n.attributes.get("alpha")
            return QUICK_GELU_ALPHA if a is None else float(a.value)
    for n in site.act_nodes:
        for v in n.inputs:
            c = const_array(v) if v is not None else None
            if c is not None and c.size == 1 and abs(float(c.ravel()[0]) - QUICK_GELU_ALPHA) < 1e-3:
                return float(c.ravel()[0])
    return QUICK_GELU_ALPHA


def _fused_bias(site: MlpSite, idx: np.ndarray) -> np.ndarray | None:
    """A fused activation's per-unit bias (BiasGelu / FastGelu input 1), sliced to the units."""
    for n in site.act_nodes:
        if n.op_type in ("BiasGelu", "FastGelu") and len(n.inputs) > 1 and n.inputs[1] is not None:
            c = const_array(n.inputs[1])
            if c is not None and c.size == site.width:
                return np.ascontiguousarray(c.reshape(-1)[idx]).astype(COMPUTE_DTYPE)
    return None


def _sigmoid(b: Any, t: ir.Value) -> ir.Value:
    e = b.op("Exp", [b.op("Neg", [b.op("Abs", [t])])])
    r = b.op("Reciprocal", [b.op("Add", [e, b.const("one", np.ones((), COMPUTE_DTYPE))])])
    nonneg = b.op("GreaterOrEqual", [t, b.const("zero", np.zeros((), COMPUTE_DTYPE))])
    return b.op("Where", [nonneg, r, b.op("Mul", [e, r])])


def _gather(b: Any, v: ir.Value, idx: np.ndarray, dtype: np.dtype) -> ir.Value:
    z = b.op("Gather", [v, b.i64("units", [int(i) for i in idx])], {"axis": -1})
    if np.dtype(dtype) != COMPUTE_DTYPE:
        z = b.op("Cast", [z], {"to": ir.DataType.from_numpy(np.dtype(COMPUTE_DTYPE))})
    return z


def unit_activation(b: Any, site: MlpSite, idx: np.ndarray, pre_dtype: np.dtype) -> ir.Value:
    """Post-activation of units `idx` of `site`, float32 [B, N, k]; `b` is the rewrite's node builder,
    `pre_dtype` the dtype of the MLP's pre-activation tensor."""
    act = _activation(b, site, _gather(b, site.pre, idx, pre_dtype), idx)
    if site.up is None:
        return act
    return b.op("Mul", [act, _gather(b, site.up, idx, pre_dtype)])


def _activation(b: Any, site: MlpSite, z: ir.Value, idx: np.ndarray) -> ir.Value:
    bias = _fused_bias(site, idx)
    if bias is not None:
        z = b.op("Add", [z, b.const(f"block{site.block}_reg_act_bias", bias)])

    def c(what: str, x: float) -> ir.Value:
        return b.const(what, np.asarray(x, dtype=COMPUTE_DTYPE))

    if site.activation in SIGMOID_GATES:  # z * sigmoid(alpha (z + cubic z^3)), the graph's own QuickGELU alpha
        alpha, cubic = SIGMOID_GATES[site.activation]
        alpha = _alpha(site) if site.activation == "quick_gelu" else alpha
        u = b.op("Add", [z, b.op("Mul", [b.op("Mul", [b.op("Mul", [z, z]), z]), c("cubic", cubic)])]) if cubic else z
        return b.op("Mul", [z, _sigmoid(b, u if alpha == 1.0 else b.op("Mul", [u, c("alpha", alpha)]))])
    erf = b.op("Erf", [b.op("Mul", [z, c("inv_sqrt2", 1 / math.sqrt(2.0))])])
    return b.op("Mul", [b.op("Mul", [z, c("half", 0.5)]), b.op("Add", [erf, c("one", 1.0)])])
