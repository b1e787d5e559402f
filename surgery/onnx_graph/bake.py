"""Bake test-time registers into a recognised ONNX ViT graph (onnx-ir rewrite, no PyTorch model).

The rewrite mirrors `surgery.core.modules` node for node:
- `PrependRegisters`: a constant [1, R, D] zero initializer, broadcast to the batch and concatenated after
  the prefix tokens at the register entry (before the pre-norm);
- `RegisterMlp`: in each listed block, the register units' fc1 columns (+ bias) and fc2 rows move to a
  small branch (new initializers; the ordinary MatMuls keep their shape with those columns/rows zeroed),
  the activation subgraph is cloned onto the branch (per-unit constants of fused activations sliced), the
  branch's rows are edited as `register_rows` does (ArgMax/GatherElements: signed max, shared or per
  neuron, times scale; prefix rows unchanged) and its output projection runs on the prefix + register
  rows only, added to fc2's output before the bias.
Constants that fix the token count (exporters write it into Reshape shapes, e.g. [-1, N, heads, dh])
and token slices starting at the prefix count (patch pooling) are moved by R, as the baked PyTorch
model's raised `num_prefix_tokens` does. The batch axis stays dynamic; every output is kept.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import onnx_ir as ir

from .. import __version__
from ..core.errors import ModelInputError
from ..core.output_format import OnnxMetadata
from ..core.recipe import Recipe, validate_recipe_for_model
from .discover import TokenLayout
from .recognise import MlpSite, VitGraph, const_array, node_label

INT64_MAX = np.iinfo(np.int64).max
_F64_OPS = {"Mul", "Sigmoid", "Tanh", "Add", "Sub", "Div", "Pow", "Identity"}


class _Builder:
    """New nodes and initializers, named after a prefix, appended to the graph at the end (then sorted)."""

    def __init__(self, graph: ir.Graph, prefix: str) -> None:
        self.graph = graph
        self.prefix = prefix
        self.nodes: list[ir.Node] = []
        self.count = 0

    def _name(self, what: str) -> str:
        self.count += 1
        return f"{self.prefix}/{what}_{self.count}"

    def const(self, what: str, array: np.ndarray) -> ir.Value:
        if array.ndim == 0:  # scalars as [1] (broadcasts the same; 0-d initializers lose their rank in onnx-ir)
            array = array.reshape(1)
        v = ir.Value(name=self._name(what), const_value=ir.tensor(np.ascontiguousarray(array)))
        v.shape = ir.Shape(array.shape)
        v.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
        self.graph.register_initializer(v)
        return v

    def op(self, op_type: str, inputs: list[Optional[ir.Value]], attributes: Optional[dict[str, Any]] = None,
           domain: str = "", num_outputs: int = 1) -> ir.Value:
        name = self._name(op_type)
        attrs = [ir.convenience.convert_attribute(k, v) for k, v in (attributes or {}).items()]
        node = ir.Node(domain, op_type, inputs, attrs, num_outputs=num_outputs, name=name)
        for i, o in enumerate(node.outputs):
            o.name = f"{name}:{i}"
        self.nodes.append(node)
        return node.outputs[0]

    def clone(self, node: ir.Node, inputs: list[Optional[ir.Value]]) -> ir.Node:
        name = self._name(node.op_type)
        new = ir.Node(node.domain, node.op_type, inputs, list(node.attributes.values()),
                      num_outputs=len(node.outputs), name=name, version=node.version)
        for i, o in enumerate(new.outputs):
            o.name = f"{name}:{i}"
        self.nodes.append(new)
        return new

    def i64(self, what: str, values: list[int]) -> ir.Value:
        return self.const(what, np.asarray(values, dtype=np.int64))

    def commit(self) -> None:
        self.graph.extend(self.nodes)


def _descendants(start: ir.Value) -> tuple[list[ir.Node], set[int]]:
    nodes: dict[int, ir.Node] = {}
    values = {id(start)}
    stack = [start]
    while stack:
        v = stack.pop()
        for u in v.uses():
            n = u.node
            if id(n) in nodes:
                continue
            nodes[id(n)] = n
            for o in n.outputs:
                if id(o) not in values:
                    values.add(id(o))
                    stack.append(o)
    return list(nodes.values()), values


def _replace_uses(old: ir.Value, new: ir.Value, keep: set[int]) -> None:
    for u in list(old.uses()):
        if id(u.node) not in keep:
            u.node.replace_input_with(u.idx, new)
    if old.is_graph_output():
        raise ModelInputError(f"'{old.name}' is a graph output; cannot rewrite around it")


def _insert_registers(b: _Builder, vit: VitGraph, layout: TokenLayout, R: int, dtype: np.dtype) -> ir.Value:
    x = vit.entry
    p = layout.num_prefix
    before = len(b.nodes)
    reg = b.const("register_tokens", np.zeros((1, R, vit.embed_dim), dtype=dtype))
    batch = b.op("Shape", [x], {"start": 0, "end": 1})
    shape = b.op("Concat", [batch, b.i64("ones", [1, 1])], {"axis": 0})
    regs = b.op("Expand", [reg, shape])
    axis = b.i64("axis1", [1])
    patches = b.op("Slice", [x, b.i64("start", [p]), b.i64("end", [INT64_MAX]), axis])
    parts = [regs, patches]
    if p:
        parts.insert(0, b.op("Slice", [x, b.i64("start", [0]), b.i64("end", [p]), axis]))
    new = b.op("Concat", parts, {"axis": 1})
    _replace_uses(x, new, {id(n) for n in b.nodes[before:]})
    return new


def _edit_rows(b: _Builder, h: ir.Value, p: int, R: int, k: int, scale: float, per_neuron: bool,
               dtype: Any = np.float32) -> ir.Value:
    """`register_rows(h, p, R, scale, per_neuron)` in ONNX: [B, p + R, k]."""
    if per_neuron:
        idx = b.op("ArgMax", [b.op("Abs", [h])], {"axis": 1, "keepdims": 1})  # [B, 1, k]
        m = b.op("GatherElements", [h, idx], {"axis": 1})
    else:
        flat = b.op("Reshape", [h, b.i64("flat", [0, -1])])  # [B, N*k]
        idx = b.op("ArgMax", [b.op("Abs", [flat])], {"axis": 1, "keepdims": 1})  # [B, 1]
        m = b.op("Reshape", [b.op("GatherElements", [flat, idx], {"axis": 1}), b.i64("b11", [0, 1, 1])])
    if scale != 1.0:
        m = b.op("Mul", [m, b.const("scale", np.asarray(scale, dtype=dtype))])
    reg = b.op("Expand", [m, b.i64("rk", [1, R, k])])
    if p == 0:
        return reg
    head = b.op("Slice", [h, b.i64("start", [0]), b.i64("end", [p]), b.i64("axis1", [1])])
    return b.op("Concat", [head, reg], {"axis": 1})


def uses_float64(site: MlpSite) -> bool:
    """As vit-surgery's own export does: the k register units' activation and edit run in float64 where
    onnxruntime has float64 kernels for every op (not Erf, not the fused GELUs), because the register
    row's signed max can sit in the activation's far tail, where float32 kernels differ relatively."""
    return all((n.op_type in _F64_OPS and n.domain in ("", "ai.onnx")) or n.op_type == "QuickGelu"
               for n in site.act_nodes)


def clone_activation(b: _Builder, site: MlpSite, pre: ir.Value, idx: np.ndarray, order: dict[int, int], *,
                     strip_ordinary: bool) -> tuple[ir.Value, bool]:
    """The block's activation subgraph applied to `pre` (the k register units' pre-activation), per-unit
    constants sliced to the units; with `strip_ordinary` those units are also zeroed in the original
    subgraph's per-unit constants. Returns (post-activation [B, N, k], whether it runs in float64)."""
    H = site.width
    f64 = uses_float64(site)
    if f64:
        pre = b.op("Cast", [pre], {"to": ir.DataType.DOUBLE})
    mapping: dict[int, ir.Value] = {id(site.pre): pre}
    for node in sorted(site.act_nodes, key=lambda n: order[id(n)]):
        if f64 and node.op_type == "QuickGelu":  # onnxruntime's fused x * sigmoid(alpha x), float32 only
            a = node.attributes.get("alpha")
            z = mapping[id(node.inputs[0])]
            alpha = b.const("alpha", np.asarray(1.702 if a is None else a.value, dtype=np.float64))
            mapping[id(node.outputs[0])] = b.op("Mul", [z, b.op("Sigmoid", [b.op("Mul", [z, alpha])])])
            continue
        ins: list[Optional[ir.Value]] = []
        for j, v in enumerate(node.inputs):
            if v is not None and id(v) in mapping:
                ins.append(mapping[id(v)])
                continue
            c = const_array(v) if v is not None else None
            if c is not None and c.size == H and c.shape[-1] == H:  # per-unit constant (fused bias)
                if strip_ordinary:
                    cz = c.copy(); cz.reshape(-1)[idx] = 0
                    node.replace_input_with(j, b.const(f"block{site.block}_act_const", cz))
                unit_c = np.ascontiguousarray(c.reshape(-1)[idx])
                ins.append(b.const(f"block{site.block}_reg_act_const", unit_c.astype(np.float64) if f64 else unit_c))
            elif f64 and c is not None and c.dtype.kind == "f":
                ins.append(b.const(f"block{site.block}_reg_act_const64", c.astype(np.float64)))
            else:
                ins.append(v)
        new = b.clone(node, ins)
        for o, no in zip(node.outputs, new.outputs):
            mapping[id(o)] = no
    hr = mapping.get(id(site.hidden))
    if hr is None:
        raise ModelInputError(f"block {site.block}: could not rebuild the activation at "
                              f"{node_label(site.hidden.producer())}")
    return hr, f64


def _split_mlp(b: _Builder, site: MlpSite, units: list[int], p: int, R: int, scale: float, per_neuron: bool,
               order: dict[int, int]) -> None:
    H = site.width
    idx = np.asarray(sorted(units), dtype=np.int64)
    w1 = const_array(site.fc1.inputs[1])
    w2 = const_array(site.fc2.inputs[1])
    # the ordinary MLP: same shapes, register units removed (new initializers: exporters share constants)
    w1z = w1.copy(); w1z[:, idx] = 0
    w2z = w2.copy(); w2z[idx, :] = 0
    site.fc1.replace_input_with(1, b.const(f"block{site.block}_fc1_weight", w1z))
    site.fc2.replace_input_with(1, b.const(f"block{site.block}_fc2_weight", w2z))
    x = site.fc1.inputs[0]
    r = b.op("MatMul", [x, b.const(f"block{site.block}_reg_fc1_weight", np.ascontiguousarray(w1[:, idx]))])
    if site.fc1_bias_add is not None:
        add = site.fc1_bias_add
        bi = next(i for i, v in enumerate(add.inputs) if v is not site.fc1.outputs[0])
        bias = const_array(add.inputs[bi])
        bz = bias.copy(); bz.reshape(-1)[idx] = 0
        r = b.op("Add", [r, b.const(f"block{site.block}_reg_fc1_bias", np.ascontiguousarray(bias.reshape(-1)[idx]))])
        add.replace_input_with(bi, b.const(f"block{site.block}_fc1_bias", bz))
    hr, f64 = clone_activation(b, site, r, idx, order, strip_ordinary=True)
    head = _edit_rows(b, hr, p, R, len(idx), scale, per_neuron, np.float64 if f64 else np.float32)
    if f64:
        head = b.op("Cast", [head], {"to": ir.DataType.from_numpy(w2.dtype)})
    hb = b.op("MatMul", [head, b.const(f"block{site.block}_reg_fc2_weight", np.ascontiguousarray(w2[idx, :]))])
    y = site.down
    before = len(b.nodes)
    q = p + R
    axis = b.i64("axis1", [1])
    top = b.op("Slice", [y, b.i64("start", [0]), b.i64("end", [q]), axis])
    rest = b.op("Slice", [y, b.i64("start", [q]), b.i64("end", [INT64_MAX]), axis])
    new_y = b.op("Concat", [b.op("Add", [top, hb]), rest], {"axis": 1})
    _replace_uses(y, new_y, {id(n) for n in b.nodes[before:]})


# inputs that hold shapes or sizes, and the integer arithmetic exporters compute them with
_SHAPE_INPUTS = {"Reshape": (1,), "Expand": (1,), "ConstantOfShape": (0,), "Tile": (1,), "Slice": (1, 2),
                 "Range": (0, 1), "Resize": (3,), "Split": (1,)}
_SHAPE_OPS = {"Concat", "Unsqueeze", "Squeeze", "Gather", "Slice", "Mul", "Add", "Sub", "Div", "Cast", "Identity",
              "Reshape", "Max", "Min"}


def _shift_shape_input(b: _Builder, consumer: ir.Node, j: int, N: int, R: int) -> list[str]:
    """Integer constants that the `j`th (shape) input of `consumer` is computed from: entries equal to the
    token count N become N + R (new constants; the old ones may be shared with nodes upstream)."""
    changed: list[str] = []
    stack: list[tuple[ir.Node, int]] = [(consumer, j)]
    seen: set[int] = set()
    while stack:
        node, k = stack.pop()
        v = node.inputs[k]
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        c = const_array(v)
        if c is not None:
            if c.dtype.kind in "iu" and c.size <= 8 and np.any(c == N):
                c2 = np.where(c == N, N + R, c).astype(c.dtype)
                node.replace_input_with(k, b.const("tokens", c2))
                changed.append(f"{node_label(node)} input {k}: {c.tolist()} -> {c2.tolist()}")
            continue
        p = v.producer()
        if p is not None and p.op_type in _SHAPE_OPS and p.domain in ("", "ai.onnx"):
            stack.extend((p, i) for i in range(len(p.inputs)))
    return changed


def _shift_token_constants(b: _Builder, start: ir.Value, layout: TokenLayout, R: int, own: set[int]) -> list[str]:
    """Constants downstream of the register entry that encode the token count N or slice from the prefix
    count p: N -> N + R, p -> p + R. Returns a description of each change."""
    N, p = layout.num_tokens, layout.num_prefix
    changed: list[str] = []
    nodes, values = _descendants(start)
    for node in nodes:
        if id(node) in own:
            continue
        for j in _SHAPE_INPUTS.get(node.op_type, ()):
            if j < len(node.inputs) and node.inputs[j] is not None:
                changed += _shift_shape_input(b, node, j, N, R)
        if node.op_type == "Slice" and len(node.inputs) >= 4:
            starts, ends, axes = (const_array(node.inputs[i]) for i in (1, 2, 3))
            if starts is None or ends is None or axes is None or 1 not in axes.tolist():
                continue
            j = axes.tolist().index(1)
            s2, e2 = starts.copy(), ends.copy()
            if p and int(starts[j]) == p:
                s2[j] = p + R
            if s2[j] != starts[j]:
                node.replace_input_with(1, b.const("starts", s2))
            if e2[j] != ends[j]:
                node.replace_input_with(2, b.const("ends", e2))
            if s2[j] != starts[j] or e2[j] != ends[j]:
                changed.append(f"{node_label(node)} token slice {int(starts[j])}:{int(ends[j])} -> "
                               f"{int(s2[j])}:{int(e2[j])}")
    for node in nodes:  # shapes inferred for the old token count are stale downstream
        for o in node.outputs:
            if o.is_graph_output():
                dims = list(o.shape) if o.shape is not None else []
                if len(dims) >= 2 and dims[1] == N:
                    dims[1] = N + R
                    o.shape = ir.Shape(dims)
            elif id(o) in values:
                o.shape = None
    return changed


def _side_tensors(vit: VitGraph, layout: TokenLayout) -> list[tuple[ir.Value, np.ndarray]]:
    """Tensors computed without the image (from constants and the batch size, e.g. an attention mask that
    masks nothing) that meet the token stream downstream of the entry with a token axis of size N.
    Returned with their value at batch 2: they must be uniform to be re-made for N + R tokens."""
    from .runtime import ExposedSession

    nodes, values = _descendants(vit.entry)
    image = vit.model.graph.inputs[0]
    side: dict[int, ir.Value] = {}
    for node in nodes:
        for v in node.inputs:
            if v is None or id(v) in values or const_array(v) is not None or id(v) in side:
                continue
            if _image_free(v, image):
                side[id(v)] = v
    if not side:
        return []
    c, h, w = (int(d) for d in list(image.shape)[1:])
    sess = ExposedSession(vit.model, list(side.values()), str(vit.path))
    try:
        _, got = sess.run(np.zeros((2, c, h, w), dtype=np.float32))
    finally:
        sess.close()
    return [(v, a) for v, a in zip(side.values(), got) if layout.num_tokens in a.shape[1:]]


def _image_free(v: ir.Value, image: ir.Value) -> bool:
    """Does `v` depend on the image only through Shape (the batch size)?"""
    stack, seen = [v], set()
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if x is image:
            return False
        p = x.producer()
        if p is None or p.op_type == "Shape":
            continue
        stack.extend(i for i in p.inputs if i is not None)
    return True


def _remake_side_tensors(b: _Builder, side: list[tuple[ir.Value, np.ndarray]], layout: TokenLayout, R: int) -> list[str]:
    N = layout.num_tokens
    done = []
    for v, a in side:
        flat = a.reshape(-1)
        if flat.size == 0 or not np.all(flat == flat[0]):
            raise ModelInputError(f"'{v.name}' (from {node_label(v.producer())}) depends on the token count "
                                  f"{N} and is not uniform (an attention mask that masks something?): cannot add "
                                  "register tokens")
        shape = [1] + [N + R if d == N else d for d in a.shape[1:]]
        new = b.const("uniform", np.full(shape, flat[0], dtype=a.dtype))
        for u in list(v.uses()):
            u.node.replace_input_with(u.idx, new)
        done.append(f"'{v.name}' {list(a.shape)} (uniform {flat[0]!r}) -> {shape}")
    return done


def bake_graph(vit: VitGraph, recipe: Recipe, layout: TokenLayout, *, source: str = "") -> dict[str, Any]:
    """Rewrite `vit.model` in place. Returns a summary (what was changed)."""
    validate_recipe_for_model(recipe, vit.depth, vit.hidden_sizes, source="neurons")
    if layout.num_prefix == 0:
        raise ModelInputError(f"{vit.path}: no CLS/prefix token ({layout.num_tokens} tokens = patches); models "
                              "without one (attention-pool heads) are not supported on ONNX yet")
    side = _side_tensors(vit, layout)
    graph = vit.model.graph
    w_dtype = const_array(vit.mlps[0].fc2.inputs[1]).dtype
    order = {id(n): i for i, n in enumerate(graph)}
    b = _Builder(graph, "vit_surgery")
    R, p = recipe.num_registers, layout.num_prefix
    new_entry = _insert_registers(b, vit, layout, R, w_dtype)
    for block, units in recipe.neurons.items():
        _split_mlp(b, vit.mlps[block], list(units), p, R, recipe.scale, recipe.mode == "per_neuron", order)
    own = {id(n) for n in b.nodes}
    b.commit()
    shifted = _shift_token_constants(b, new_entry, layout, R, own)
    shifted += _remake_side_tensors(b, side, layout, R)
    graph.sort()
    regs = list(range(p, p + R))
    token_layout = {"num_prefix_tokens": p, "num_registers": R, "register_indices": regs, "first_patch_index": p + R,
                    "num_tokens": layout.num_tokens + R,
                    "order": "[prefix (CLS, trained registers) | test-time registers | patches]"}
    meta = OnnxMetadata(
        recipe=recipe.to_dict(), token_layout=token_layout, register_token_indices=regs, num_prefix_tokens=p,
        num_registers=R, source_model=source, family="onnx", tool_version=__version__, dtype=str(np.dtype(w_dtype)),
        exporter="vit-surgery onnx graph rewrite (onnx-ir)",
        graph_rewrite={"recognised": vit.describe(), "notes": vit.notes, "shifted_constants": shifted})
    for k, v in meta.to_props().items():
        vit.model.metadata_props[k] = v
    return {"token_layout": token_layout, "shifted_constants": shifted, "notes": vit.notes}
