"""A linear projection `y = x @ W` inside an ONNX graph, whatever stores its weight.

Three storages are recognised, the ones hub ONNX repos ship:
- `float`: `MatMul(x, W)` with a constant float32 / float16 `W[in, out]` (torch exports, the float16
  converter's output);
- `int8`: onnxruntime `quantize_dynamic` output, `DynamicQuantizeLinear(x)` -> `MatMulInteger(xq, Wq, xzp,
  Wzp)` -> `Cast` -> `Mul(., x_scale * W_scale)`, per-tensor or per-output-channel `W_scale` / `Wzp`;
- `nbits`: com.microsoft `MatMulNBits` (onnxruntime's 4-bit quantizer), `B[out, blocks, block_bytes]`
  with block-wise scales and optional packed zero points along the input axis.

What the bake needs from a weight: its rows (input units) dequantized exactly, as float32, and a copy of
the weight in which some rows contribute exactly nothing (float: zeros; int8: the zero point of each
column; nbits: each block's zero point), the rest bit for bit as stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx_ir as ir

from ..core.errors import ModelInputError
from .values import const_array, is_const, node_label

_STD = ("", "ai.onnx")


@dataclass
class Linear:
    kind: str  # "float" | "int8" | "nbits"
    node: ir.Node  # the node holding the weight: MatMul / MatMulInteger / MatMulNBits
    x: ir.Value  # the float input
    y: ir.Value  # the float output
    in_dim: int
    out_dim: int
    scale_node: Optional[ir.Node] = None  # int8: Mul(x_scale, W_scale)

    @property
    def name(self) -> str:
        return self.node.name or ""

    @property
    def label(self) -> str:
        return node_label(self.node)


def _int8_linear(mul: ir.Node, y: ir.Value) -> Optional[Linear]:
    for i in (0, 1):
        a, s = mul.inputs[i], mul.inputs[1 - i]
        cast = a.producer() if a is not None else None
        if cast is None or cast.op_type != "Cast":
            continue
        mi = cast.inputs[0].producer() if cast.inputs[0] is not None else None
        if mi is None or mi.op_type != "MatMulInteger" or mi.domain not in _STD:
            continue
        xq = mi.inputs[0]
        dq = xq.producer() if xq is not None else None
        if dq is None or dq.op_type != "DynamicQuantizeLinear" or xq is not dq.outputs[0]:
            continue
        wq = const_array(mi.inputs[1])
        sm = s.producer() if s is not None else None
        if wq is None or wq.ndim != 2 or sm is None or sm.op_type != "Mul":
            continue
        if not any(v is dq.outputs[1] for v in sm.inputs):
            continue
        return Linear("int8", mi, dq.inputs[0], y, int(wq.shape[0]), int(wq.shape[1]), sm)
    return None


def linear_at(v: Optional[ir.Value]) -> Optional[Linear]:
    """The linear projection whose output is `v` (activation input, constant weight), else None."""
    p = v.producer() if v is not None else None
    if p is None:
        return None
    if p.op_type == "MatMul" and p.domain in _STD:
        if is_const(p.inputs[0]):
            return None
        w = const_array(p.inputs[1])
        if w is None or w.ndim != 2 or w.dtype.kind != "f":
            return None
        return Linear("float", p, p.inputs[0], v, int(w.shape[0]), int(w.shape[1]))
    if p.op_type == "MatMulNBits" and p.domain == "com.microsoft":
        if is_const(p.inputs[0]) or const_array(p.inputs[1]) is None:
            return None
        return Linear("nbits", p, p.inputs[0], v, int(p.attributes["K"].value), int(p.attributes["N"].value))
    if p.op_type == "Mul" and p.domain in _STD:
        return _int8_linear(p, v)
    return None


# --- int8 (quantize_dynamic) -------------------------------------------------------------------------

def _int8_parts(lin: Linear) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(Wq [in, out], zero point broadcastable to it, W scale broadcastable to it, index of W scale in the
    scale Mul)."""
    wq = const_array(lin.node.inputs[1])
    zp_v = lin.node.inputs[3] if len(lin.node.inputs) > 3 else None
    zp = const_array(zp_v) if zp_v is not None else np.zeros((), dtype=wq.dtype)
    sm = lin.scale_node
    j = next(i for i, v in enumerate(sm.inputs) if const_array(v) is not None)
    scale = const_array(sm.inputs[j]).astype(np.float32)
    if zp is None or zp.size not in (1, lin.out_dim) or scale.size not in (1, lin.out_dim):
        raise ModelInputError(f"{lin.label}: weight zero point / scale are neither per-tensor nor per output "
                              "channel")
    return wq, zp.reshape(1, -1), scale.reshape(1, -1), j


# --- nbits (MatMulNBits) -----------------------------------------------------------------------------

def _nbits_parts(lin: Linear) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(q [out, blocks * block size] unpacked integers (padding past `in` kept), zero points [out, blocks], scales [out, blocks], block size)."""
    n = lin.node
    bits = int(n.attributes["bits"].value)
    bs = int(n.attributes["block_size"].value)
    K, N = lin.in_dim, lin.out_dim
    ins = list(n.inputs) + [None] * 6
    if bits != 4:
        raise ModelInputError(f"{lin.label}: {bits}-bit MatMulNBits is not supported (4-bit only)")
    if ins[4] is not None:
        raise ModelInputError(f"{lin.label}: MatMulNBits with g_idx (act-order) reorders the input rows; "
                              "cannot keep a register unit's rows inside its block")
    blocks = (K + bs - 1) // bs
    packed = const_array(ins[1])
    scales = const_array(ins[2])
    if packed is None or scales is None or packed.dtype != np.uint8:
        raise ModelInputError(f"{lin.label}: MatMulNBits weight or scales are not constants")
    packed = packed.reshape(N, blocks, bs // 2)
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(N, blocks * bs)  # padded past K
    zp_raw = const_array(ins[3]) if ins[3] is not None else None
    if ins[3] is not None and zp_raw is None:
        raise ModelInputError(f"{lin.label}: MatMulNBits zero points are not constant")
    if zp_raw is None:
        zp = np.full((N, blocks), 8, dtype=np.int16)
    elif zp_raw.dtype == np.uint8:
        zp2 = zp_raw.reshape(N, -1)
        zp = np.stack([zp2 & 0x0F, zp2 >> 4], axis=-1).reshape(N, -1)[:, :blocks].astype(np.int16)
    else:
        raise ModelInputError(f"{lin.label}: MatMulNBits has {zp_raw.dtype} zero points: a register unit's "
                              "rows cannot be set to a value that dequantizes to exactly zero")
    return q.astype(np.int16), zp, scales.reshape(N, blocks).astype(np.float32), bs


# --- what the bake uses ------------------------------------------------------------------------------

def dequantized_rows(lin: Linear, idx: np.ndarray) -> np.ndarray:
    """W[idx, :] as the graph computes with it, float32 for quantized storages (else the stored dtype)."""
    if lin.kind == "float":
        return np.ascontiguousarray(const_array(lin.node.inputs[1])[idx, :])
    if lin.kind == "int8":
        wq, zp, scale, _ = _int8_parts(lin)
        return np.ascontiguousarray((wq[idx, :].astype(np.float32) - zp.astype(np.float32)) * scale)
    q, zp, scales, bs = _nbits_parts(lin)
    blk = idx // bs
    return np.ascontiguousarray(((q[:, idx] - zp[:, blk]).astype(np.float32) * scales[:, blk]).T)


def silence_rows(lin: Linear, idx: np.ndarray, const) -> None:
    """Replace the weight of a float or 4-bit projection by a copy whose rows `idx` contribute exactly zero
    (`const(what, array)` makes an initializer); every other entry, scale and zero point is kept as stored.
    An INT8 projection's input is edited in place instead (bake._edit_in_place): never silenced here."""
    n = lin.node
    if lin.kind == "int8":
        raise AssertionError("INT8 fc2 inputs are edited in place; their weights stay as stored")
    if lin.kind == "float":
        w = const_array(n.inputs[1]).copy()
        w[idx, :] = 0
        n.replace_input_with(1, const("fc2_weight", w))
        return
    q, zp, _, bs = _nbits_parts(lin)
    q = q.copy()
    q[:, idx] = zp[:, idx // bs]
    N, blocks = zp.shape
    pairs = q.astype(np.uint8).reshape(N, blocks, bs // 2, 2)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    old = const_array(n.inputs[1])
    n.replace_input_with(1, const("fc2_weight_q4", packed.reshape(old.shape)))


def input_quantizer(lin: Linear) -> Optional[tuple[ir.Value, ir.Value]]:
    """(scale, zero point) that an int8 projection's `DynamicQuantizeLinear` computes for its whole input
    tensor, else None. The bake uses it to tell a dynamically quantized fc2 input, which it edits in place
    rather than branching around (the range is taken over the whole tensor: see bake._edit_in_place)."""
    if lin.kind != "int8":
        return None
    dq = lin.node.inputs[0].producer()
    return dq.outputs[1], dq.outputs[2]
