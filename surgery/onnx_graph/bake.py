"""Bake test-time registers into a recognised ONNX ViT graph (onnx-ir rewrite, no PyTorch model).

The rewrite mirrors `surgery.core.modules` node for node:
- `PrependRegisters`: a constant [1, R, D] zero initializer, broadcast to the batch and concatenated after
  the prefix tokens at the register entry (before the pre-norm);
- `RegisterMlp`: in each listed block, the register units' pre-activations are gathered from fc1's own
  output (fc1 is untouched), their GELU is recomputed in float32 (`unit_activation.py`), the rows are
  edited as `register_rows` does (ArgMax/GatherElements: signed max, shared or per neuron, times scale;
  prefix rows unchanged) and projected by those units' fc2 rows, dequantized exactly (`linear.py`), on the
  prefix + register rows only, added to fc2's output before the bias; in the ordinary fc2 those rows
  contribute exactly zero (a new initializer: zeros, or the zero point of a 4-bit weight). An MLP whose
  fc2 input is dynamically quantized (INT8) is edited in place instead (`_edit_in_place`: why there).
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
from .discover import TokenLayout, static_input_size
from .linear import dequantized_rows, input_quantizer, silence_rows
from .recognise import MlpSite, VitGraph, const_array, node_label
from .sibling_config import sibling_config
from .unit_activation import COMPUTE_DTYPE, unit_activation
from .values import copies_chain
from .vision_encoder import drop_register_rows, is_vision_encoder, source_outputs

INT64_MAX = np.iinfo(np.int64).max


class NodeBuilder:
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
        self._committed = len(self.nodes)

    def commit_new(self) -> None:
        """Add the nodes made since `commit` (later passes build on a committed graph)."""
        self.graph.extend(self.nodes[getattr(self, "_committed", 0):])
        self._committed = len(self.nodes)


def _descendants(start: ir.Value, stop: frozenset[int] = frozenset()) -> tuple[list[ir.Node], set[int]]:
    """Nodes and values downstream of `start` (not through the nodes in `stop`)."""
    nodes: dict[int, ir.Node] = {}
    values = {id(start)}
    stack = [start]
    while stack:
        v = stack.pop()
        for u in v.uses():
            n = u.node
            if id(n) in nodes or id(n) in stop:
                continue
            nodes[id(n)] = n
            for o in n.outputs:
                if id(o) not in values:
                    values.add(id(o))
                    stack.append(o)
    return list(nodes.values()), values


def replace_uses(old: ir.Value, new: ir.Value, keep: set[int]) -> None:
    for u in list(old.uses()):
        if id(u.node) not in keep:
            u.node.replace_input_with(u.idx, new)
    if old.is_graph_output():
        raise ModelInputError(f"'{old.name}' is a graph output; cannot rewrite around it")


def insert_registers(b: NodeBuilder, vit: VitGraph, layout: TokenLayout, R: int, dtype: np.dtype) -> ir.Value:
    x = vit.entry
    p = layout.num_prefix
    before = len(b.nodes)
    reg = b.const("register_tokens", np.zeros((1, R, vit.embed_dim), dtype=dtype))
    if vit.model.opset_imports.get("", 18) >= 15:
        batch = b.op("Shape", [x], {"start": 0, "end": 1})
    else:  # Shape's start / end attributes came with opset 15 (optimum exports at 14)
        batch = b.op("Slice", [b.op("Shape", [x]), b.i64("start", [0]), b.i64("end", [1]), b.i64("axis0", [0])])
    shape = b.op("Concat", [batch, b.i64("ones", [1, 1])], {"axis": 0})
    regs = b.op("Expand", [reg, shape])
    axis = b.i64("axis1", [1])
    patches = b.op("Slice", [x, b.i64("start", [p]), b.i64("end", [INT64_MAX]), axis])
    parts = [regs, patches]
    if p:
        parts.insert(0, b.op("Slice", [x, b.i64("start", [0]), b.i64("end", [p]), axis]))
    new = b.op("Concat", parts, {"axis": 1})
    replace_uses(x, new, {id(n) for n in b.nodes[before:]})
    return new


def _edit_rows(b: NodeBuilder, h: ir.Value, p: int, R: int, k: int, scale: float, per_neuron: bool,
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


def _split_mlp(b: NodeBuilder, site: MlpSite, units: list[int], p: int, R: int, scale: float, per_neuron: bool,
               dtype: np.dtype) -> None:
    """The register units of `site` move to a branch: their activation is recomputed from fc1's own output
    (`unit_activation`, float32), edited, and projected by their fc2 rows (dequantized exactly) on the
    prefix + register rows only; in the ordinary fc2 those rows contribute exactly zero (zeros or the
    zero point, everything else stored as it was). fc1 is untouched: the units' pre-activation is the one
    the source computes, in every precision. A dynamically quantized fc2 input (INT8) gets no branch: the
    units are edited inside that input instead (`_edit_in_place`)."""
    idx = np.asarray(sorted(units), dtype=np.int64)
    hr = unit_activation(b, site, idx, dtype)
    head = _edit_rows(b, hr, p, R, len(idx), scale, per_neuron, COMPUTE_DTYPE)
    if input_quantizer(site.fc2) is not None:
        _edit_in_place(b, site, idx, hr, head, p, R, dtype)
        return
    rows = dequantized_rows(site.fc2, idx).astype(COMPUTE_DTYPE)  # float16 -> float32 is exact
    silence_rows(site.fc2, idx, lambda what, a: b.const(f"block{site.block}_{what}", a))
    hb = b.op("MatMul", [head, b.const(f"block{site.block}_reg_fc2_weight", rows)])
    if np.dtype(dtype) != COMPUTE_DTYPE:
        hb = b.op("Cast", [hb], {"to": ir.DataType.from_numpy(np.dtype(dtype))})
    y = site.down
    before = len(b.nodes)
    q = p + R
    axis = b.i64("axis1", [1])
    top = b.op("Slice", [y, b.i64("start", [0]), b.i64("end", [q]), axis])
    rest = b.op("Slice", [y, b.i64("start", [q]), b.i64("end", [INT64_MAX]), axis])
    new_y = b.op("Concat", [b.op("Add", [top, hb]), rest], {"axis": 1})
    replace_uses(y, new_y, {id(n) for n in b.nodes[before:]})


def _edit_in_place(b: NodeBuilder, site: MlpSite, idx: np.ndarray, hr: ir.Value, head: ir.Value, p: int, R: int,
                   dtype: np.dtype) -> None:
    """An MLP whose fc2 input is dynamically quantized (`DynamicQuantizeLinear`, INT8): the register units
    are edited inside fc2's input (patch rows 0, prefix + register rows `head`), fc2 left as stored. Why no
    branch: the quantizer's range (hence its scale and zero point, the grid of every unit) is taken over the
    whole input tensor, and in the hooked reference that tensor holds the edited values. A branch leaves
    the units' patch values in it (it silences only their weight rows): when one of them is the tensor's
    minimum or maximum (a GELU-family unit is bounded below, near -0.17 to -0.28, and a patch value there
    can be the tensor's minimum; a gated unit is unbounded on both sides) the range differs from the
    hooked one and every other unit is rounded on another grid. Only editing that tensor reproduces the
    hooked quantizer."""
    k = len(idx)
    rest = b.op("Slice", [hr, b.i64("start", [p + R]), b.i64("end", [INT64_MAX]), b.i64("axis1", [1])])
    zeros = b.op("Mul", [rest, b.const("zero", np.zeros((), dtype=COMPUTE_DTYPE))])
    edited = b.op("Concat", [head, zeros], {"axis": 1})  # [B, N, k]
    if np.dtype(dtype) != COMPUTE_DTYPE:
        edited = b.op("Cast", [edited], {"to": ir.DataType.from_numpy(np.dtype(dtype))})
    keep = np.ones(site.width, dtype=dtype)
    keep[idx] = 0
    onehot = np.zeros((k, site.width), dtype=dtype)
    onehot[np.arange(k), idx] = 1
    before = len(b.nodes)
    new_h = b.op("Add", [b.op("Mul", [site.hidden, b.const(f"block{site.block}_keep", keep)]),
                         b.op("MatMul", [edited, b.const(f"block{site.block}_onehot", onehot)])])
    replace_uses(site.hidden, new_h, {id(n) for n in b.nodes[before:]})


# inputs that hold shapes or sizes, and the integer arithmetic exporters compute them with
_SHAPE_INPUTS = {"Reshape": (1,), "Expand": (1,), "ConstantOfShape": (0,), "Tile": (1,), "Slice": (1, 2),
                 "Range": (0, 1), "Resize": (3,), "Split": (1,)}
_SHAPE_OPS = {"Concat", "Unsqueeze", "Squeeze", "Gather", "Slice", "Mul", "Add", "Sub", "Div", "Cast", "Identity",
              "Reshape", "Max", "Min"}


def _shift_shape_input(b: NodeBuilder, consumer: ir.Node, j: int, N: int, R: int, dim: Optional[int] = None) -> list[str]:
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
                if dim == N and c.ndim == 1:
                    # tokens == width: only [batch, N, ...] is the token axis ([-1, 1, D] after pooling is not)
                    c2 = c.copy()
                    if c.size > 1 and c[1] == N:
                        c2[1] = N + R
                    if np.array_equal(c2, c):
                        continue
                node.replace_input_with(k, b.const("tokens", c2))
                changed.append(f"{node_label(node)} input {k}: {c.tolist()} -> {c2.tolist()}")
            continue
        p = v.producer()
        if p is not None and p.op_type in _SHAPE_OPS and p.domain in ("", "ai.onnx"):
            stack.extend((p, i) for i in range(len(p.inputs)))
    return changed


def shift_token_constants(b: NodeBuilder, start: ir.Value, layout: TokenLayout, R: int, own: set[int],
                           dim: Optional[int] = None, stop: frozenset[int] = frozenset()) -> list[str]:
    """Constants downstream of the register entry (up to the nodes in `stop`) that encode the token count N
    or slice from the prefix count p: N -> N + R, p -> p + R. Returns a description of each change."""
    N, p = layout.num_tokens, layout.num_prefix
    changed: list[str] = []
    nodes, values = _descendants(start, stop)
    for node in nodes:
        if id(node) in own:
            continue
        for j in _SHAPE_INPUTS.get(node.op_type, ()):
            if j < len(node.inputs) and node.inputs[j] is not None:
                changed += _shift_shape_input(b, node, j, N, R, dim)
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


def side_tensors(vit: VitGraph, layout: TokenLayout) -> list[tuple[ir.Value, np.ndarray]]:
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
    c, h, w = static_input_size(vit)
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


def remake_side_tensors(b: NodeBuilder, side: list[tuple[ir.Value, np.ndarray]], layout: TokenLayout, R: int) -> list[str]:
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


# HF model types whose attention-pool head reads every token, the register included (as vit-surgery's HF
# SigLIP backend bakes it: surgery/backends/hf/dinov3_siglip.py)
HEAD_READS_REGISTERS = frozenset({"siglip_vision_model", "siglip"})


def pool_without_registers(b: NodeBuilder, vit: VitGraph, layout: TokenLayout, R: int) -> tuple[list[str], frozenset[int]]:
    """A model without prefix tokens (SigLIP: attention-pool head) pools over the patches only, as the
    baked timm model does (timm's `x[:, num_prefix_tokens:]` before `attn_pool`, with the registers
    counted as prefix): every use of a token output other than the output itself reads it from R on.
    An HF SigLIP (config.json `model_type` in HEAD_READS_REGISTERS) keeps its head reading every token,
    as the baked HF model does; the graph alone cannot tell the two apart.
    Returns (notes, the new Slice nodes: the head behind them keeps its N-token constants)."""
    if layout.num_prefix:
        return [], frozenset()
    mt = str(sibling_config(vit.path).get("model_type", ""))
    if mt in HEAD_READS_REGISTERS:
        return [f"config.json model_type {mt!r}: the attention-pool head reads the register token(s) too, as "
                "HF SigLIP's baked model does"], frozenset()
    before = len(b.nodes)
    _, values = _descendants(vit.entry)
    done = []
    for out in list(vit.model.graph.outputs):
        if id(out) not in values:
            continue
        # torch's legacy exporter writes the token output as Cast(norm output) and the head reads the norm
        # output; a float32-interface float16 graph casts its float16 tokens to the output
        chain = copies_chain(out)
        for v in chain:
            skip = {id(n) for n in b.nodes} | {id(c.producer()) for c in chain[:-1]}  # ours, and the copies
            uses = [u for u in v.uses() if id(u.node) not in skip]
            if not uses:
                continue
            rest = b.op("Slice", [v, b.i64("start", [R]), b.i64("end", [INT64_MAX]), b.i64("axis1", [1])])
            for u in uses:
                u.node.replace_input_with(u.idx, rest)
            done.append(f"head reads '{v.name}' without the {R} register token(s) ({len(uses)} use(s))")
    return done, frozenset(id(n) for n in b.nodes[before:])


def bake_graph(vit: VitGraph, recipe: Recipe, layout: TokenLayout, *, source: str = "") -> dict[str, Any]:
    """Rewrite `vit.model` in place. Returns a summary (what was changed)."""
    validate_recipe_for_model(recipe, vit.depth, vit.hidden_sizes, source="neurons")
    side = side_tensors(vit, layout)
    vlm = source_outputs(vit.model, static_input_size(vit), str(vit.path)) if is_vision_encoder(vit.model) else None
    graph = vit.model.graph
    w_dtype = np.dtype(layout.dtype)
    b = NodeBuilder(graph, "vit_surgery")
    R, p = recipe.num_registers, layout.num_prefix
    new_entry = insert_registers(b, vit, layout, R, w_dtype)
    for block, units in recipe.neurons.items():
        _split_mlp(b, vit.mlps[block], list(units), p, R, recipe.scale, recipe.mode == "per_neuron", w_dtype)
    own = {id(n) for n in b.nodes}
    b.commit()
    pooled, head = pool_without_registers(b, vit, layout, R)
    b.commit_new()
    shifted = shift_token_constants(b, new_entry, layout, R, own, vit.embed_dim, head)
    shifted += remake_side_tensors(b, side, layout, R) + pooled
    graph.sort()
    if vlm is not None:  # a VLM's vision encoder: image_features keep the source's token count
        b.commit_new()
        shifted += drop_register_rows(b, vit.model, vlm, static_input_size(vit), p, R, str(vit.path))
        b.commit_new()
        graph.sort()
    regs = list(range(p, p + R))
    # num_prefix_tokens is the baked model's (registers included: patches are tokens[:, num_prefix_tokens:]),
    # num_source_prefix_tokens the source's (CLS, trained registers)
    token_layout = {"num_prefix_tokens": p + R, "num_source_prefix_tokens": p, "num_registers": R,
                    "register_indices": regs, "first_patch_index": p + R,
                    "num_tokens": layout.num_tokens + R,
                    "order": "[prefix (CLS, trained registers) | test-time registers | patches]"}
    meta = OnnxMetadata(
        recipe=recipe.to_dict(), token_layout=token_layout, register_token_indices=regs, num_prefix_tokens=p + R,
        num_source_prefix_tokens=p, num_registers=R, source_model=source, family="onnx", tool_version=__version__, dtype=str(np.dtype(w_dtype)),
        exporter="vit-surgery onnx graph rewrite (onnx-ir)",
        graph_rewrite={"recognised": vit.describe(), "notes": vit.notes, "shifted_constants": shifted})
    for k, v in meta.to_props().items():
        vit.model.metadata_props[k] = v
    return {"token_layout": token_layout, "shifted_constants": shifted, "notes": vit.notes}
