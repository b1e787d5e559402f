"""Gated (GLU / SwiGLU) MLPs inside an ONNX graph: `hidden = act(gate) * value`, then the down projection.

Two layouts are recognised, the ones the gated ViTs' exports have:
- separate projections: `gate = x @ Wg (+ bg)`, `value = x @ Wv (+ bv)` (HF DINOv2 giant's
  `gate_proj` / `up_proj`, timm `SwiGLU`'s `fc1_g` / `fc1_x`);
- one packed projection `x @ W12 (+ b12)` of width 2H, chunked on its last axis by a `Split` into two
  equal halves or by two `Slice`s of it (timm `SwiGLUPacked` / DINOv2 hub `w12`; which half is gated is
  read from the graph, so `gate_last` layouts work too).
A register neuron is a unit of the gated product (fc2's input), as in the PyTorch backends. The rewrite
never touches the input projections: it gathers unit u of `gate` and of `value` (both [..., H] and
elementwise with the product, so their unit u is the product's unit u however they were chunked) and
recomputes `act(gate_u) * value_u` (`unit_activation.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import onnx_ir as ir

from .linear import Linear, linear_at
from .values import const_array, copies_chain, is_const, node_label

_STD = ("", "ai.onnx")
# ops a gate's activation subgraph may contain (elementwise: SiLU, GELU family)
_GATE_ACT_OPS = {"Div", "Mul", "Add", "Sub", "Erf", "Sigmoid", "Tanh", "Pow", "Gelu", "FastGelu", "QuickGelu",
                 "Cast", "Identity"}
_MAX_ACT_NODES = 14


@dataclass
class Projected:
    """A [..., H] tensor read straight from an input projection: its (biased) output, or one half of a
    packed projection's output."""

    value: ir.Value
    linear: Linear
    bias_add: Optional[ir.Node]
    chunk: Optional[ir.Node]  # the Split / Slice that took it from a packed projection


@dataclass
class GatedParts:
    gate: Projected
    up: Projected
    act_nodes: list[ir.Node]  # gate activation nodes (without the product)
    product: ir.Node  # Mul(act(gate), value) = fc2's input

    @property
    def packed(self) -> bool:
        return self.gate.chunk is not None


def _through(v: ir.Value) -> ir.Value:
    """Back through pass-through ops (Identity, Cast)."""
    return copies_chain(v)[-1]


def _biased(v: ir.Value) -> Optional[tuple[Linear, Optional[ir.Node]]]:
    """`v` as a projection output, optionally plus a constant bias of its width."""
    lin = linear_at(v)
    if lin is not None:
        return lin, None
    p = v.producer()
    if p is None or p.op_type != "Add" or p.domain not in _STD or len(p.inputs) != 2:
        return None
    for i in (0, 1):
        a, b = p.inputs[i], p.inputs[1 - i]
        c = const_array(b)
        lin = linear_at(a) if a is not None else None
        if lin is not None and c is not None and c.size == lin.out_dim:
            return lin, p
    return None


def _last_axis(node: ir.Node) -> bool:
    if node.op_type == "Split":
        a = node.attributes.get("axis")
        return a is not None and a.value in (-1, 2)
    axes = const_array(node.inputs[3]) if len(node.inputs) > 3 else None
    return axes is not None and axes.size == 1 and int(axes.ravel()[0]) in (-1, 2)


def _equal_halves(split: ir.Node, H: int) -> bool:
    if len(split.outputs) != 2:
        return False
    sizes = const_array(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
    if sizes is not None:
        return sizes.ravel().tolist() == [H, H]
    a = split.attributes.get("split")  # opset < 13
    return a.value == [H, H] if a is not None else True  # no sizes: equal parts


def projected(v: ir.Value, H: int, D: int) -> Optional[Projected]:
    """`v` as a [..., H] tensor read from an input projection of D inputs (see module doc), else None."""
    v0 = _through(v)
    got = _biased(v0)
    if got is not None:
        lin, add = got
        return Projected(v0, lin, add, None) if (lin.in_dim, lin.out_dim) == (D, H) else None
    p = v0.producer()
    if p is None or p.domain not in _STD or p.op_type not in ("Split", "Slice") or not _last_axis(p):
        return None
    if p.op_type == "Split" and not _equal_halves(p, H):
        return None
    src = p.inputs[0]
    got = _biased(_through(src)) if src is not None else None
    if got is None or (got[0].in_dim, got[0].out_dim) != (D, 2 * H):
        return None
    return Projected(v0, got[0], got[1], p)


def _gate_subgraph(a: ir.Value, H: int, D: int) -> Optional[tuple[list[ir.Node], Projected]]:
    """Walk back from `a` through elementwise ops to the one projected tensor it is computed from."""
    seen: dict[int, ir.Node] = {}
    sources: dict[int, Projected] = {}
    stack = [a]
    while stack:
        v = stack.pop()
        if is_const(v):
            continue
        src = projected(v, H, D)
        if src is not None:
            sources[id(src.value)] = src
            continue
        p = v.producer()
        if p is None or p.op_type not in _GATE_ACT_OPS or p.domain not in _STD + ("com.microsoft",):
            return None
        if id(p) not in seen:
            seen[id(p)] = p
            if len(seen) > _MAX_ACT_NODES:
                return None
            stack.extend(i for i in p.inputs if i is not None)
    if len(sources) != 1 or not seen:
        return None
    return list(seen.values()), next(iter(sources.values()))


def gated_parts(hidden: ir.Value, H: int, D: int) -> Optional[GatedParts]:
    """fc2's input `hidden` [..., H] as `act(gate) * value` (gate and value projected from D inputs, gate
    and value different tensors), else None. A `x * act(x)` on one tensor (QuickGELU, SiLU) is no gate."""
    p = hidden.producer()
    if p is None or p.op_type != "Mul" or p.domain not in _STD or len(p.inputs) != 2:
        return None
    for i in (0, 1):
        up = projected(p.inputs[1 - i], H, D)
        if up is None:
            continue
        got = _gate_subgraph(p.inputs[i], H, D)
        if got is None:
            continue
        acts, gate = got
        if gate.value is up.value:
            continue
        if gate.chunk is not None or up.chunk is not None:  # both halves of one packed projection
            if gate.chunk is None or up.chunk is None or gate.linear.node is not up.linear.node:
                continue
        return GatedParts(gate, up, acts, p)
    return None


def describe_chunk(parts: GatedParts) -> str:
    g = parts.gate
    how = f"packed {g.linear.label} chunked at {node_label(g.chunk)}" if parts.packed else \
        f"{g.linear.label} and {parts.up.linear.label}"
    return how
