"""Recognise a Vision Transformer inside an ONNX graph (no PyTorch source needed).

What is found, on the onnx-ir graph (`onnx_ir`: a mutable IR with producer/consumer links, lazy external
data and faithful round trips, which plain protobuf editing lacks):
- every transformer MLP: `MatMul(x, W1[D, H])` (+ `Add(b1[H])`) -> an elementwise GELU-family activation
  subgraph -> `MatMul(h, W2[H, D])`. Activations recognised: the `Gelu` op (opset 20 / com.microsoft),
  the exact erf subgraph, tanh GELU, QuickGELU `x * sigmoid(1.702 x)`, SiLU `x * sigmoid(x)`, and
  onnxruntime's fused `FastGelu` / `BiasGelu` / `QuickGelu` (their bias inputs are per-unit constants);
  or a gated MLP `act(gate) * value` -> `MatMul(h, W2[H, D])` (SwiGLU, GeGLU: `gated.py`);
- the residual stream: each MLP's output (through an optional bias `Add` and LayerScale `Mul`) joins
  it at an `Add` or at a fused `SkipLayerNormalization` (whose optional 4th output is the sum);
- the register's entry point: the stream tensor that enters block 0, moved to before the pre-norm
  (CLIP `ln_pre`) when there is one, i.e. after the positional embedding was added.
The prefix-token count (CLS, trained registers) is measured by `probe` (tokens minus patches).
Anything else raises ModelInputError naming the node where recognition stopped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import onnx_ir as ir

from ..core.activations import GELU_TANH_CUBIC, QUICK_GELU_ALPHA
from ..core.errors import ModelInputError
from ..core.output_format import require_onnx_path
from .gated import GatedParts, describe_chunk, gated_parts
from .linear import Linear, linear_at
from .values import PASS_THROUGH, const_array, is_const, node_label
from .prescan import prescan_onnx

# ops an MLP activation subgraph may contain (elementwise, GELU family)
_ACT_OPS = {"Div", "Mul", "Add", "Sub", "Erf", "Sigmoid", "Tanh", "Pow", "Gelu", "FastGelu", "BiasGelu",
            "QuickGelu", "Cast", "Identity"}
_MAX_ACT_NODES = 14


@dataclass
class MlpSite:
    """One block's MLP in the graph. `pre` is the activation's input (fc1 output, bias added unless a fused
    activation adds it), `hidden` the post-activation units (input of fc2), `down` fc2's output
    (before its bias). fc1 / fc2 are float, dynamic-INT8 or MatMulNBits projections (`linear.py`)."""

    block: int
    fc1: Linear
    fc1_bias_add: Optional[ir.Node]
    act_nodes: list[ir.Node]
    activation: str
    pre: ir.Value
    hidden: ir.Value
    fc2: Linear
    down: ir.Value
    joins: ir.Node  # the Add / SkipLayerNormalization where the MLP output joins the residual stream
    # gated MLPs (`gated.py`): `pre` is the gate's pre-activation, `up` the value multiplied in, both
    # [..., H]; `fc1` the gate (or packed gate + value) projection, `fc1_up` a separate value projection
    up: Optional[ir.Value] = None
    fc1_up: Optional[Linear] = None
    layout: str = ""  # gated: how gate and value are projected (for describe)

    @property
    def width(self) -> int:
        return self.fc2.in_dim

    @property
    def gated(self) -> bool:
        return self.up is not None

    @property
    def projections(self) -> list[Linear]:
        return [lin for lin in (self.fc1, self.fc1_up, self.fc2) if lin is not None]


@dataclass
class VitGraph:
    model: ir.Model
    path: Path
    mlps: list[MlpSite]
    entry: ir.Value  # where the test-time registers enter: [B, N, D] before the pre-norm
    patch_conv: ir.Node
    embed_dim: int
    input_name: str
    notes: list[str] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return len(self.mlps)

    @property
    def hidden_sizes(self) -> list[int]:
        return [m.width for m in self.mlps]

    def describe(self) -> dict:
        return {"blocks": self.depth, "embed_dim": self.embed_dim, "mlp_hidden": sorted(set(self.hidden_sizes)),
                "activations": sorted({m.activation for m in self.mlps}),
                "register_entry": self.entry.name, "patch_embedding": self.patch_conv.name,
                "gated": any(m.gated for m in self.mlps),
                "mlps": [{"fc1": m.fc1.name, "activation": m.activation, "fc2": m.fc2.name, "joins": m.joins.name,
                          **({"gated": m.layout, "fc1_up": m.fc1_up.name if m.fc1_up else m.fc1.name}
                             if m.gated else {})} for m in self.mlps], "notes": self.notes}


def _classify(nodes: list[ir.Node]) -> Optional[str]:
    ops = sorted(n.op_type for n in nodes if n.op_type not in PASS_THROUGH)
    fused = {"Gelu": "gelu", "BiasGelu": "gelu", "FastGelu": "gelu_tanh", "QuickGelu": "quick_gelu"}
    if len(ops) == 1 and ops[0] in fused:
        node = next(n for n in nodes if n.op_type == ops[0])
        if ops[0] == "Gelu" and node.attributes.get("approximate") is not None \
                and node.attributes["approximate"].value == "tanh":
            return "gelu_tanh"
        if ops[0] == "QuickGelu":
            a = node.attributes.get("alpha")
            return "quick_gelu" if a is None or abs(a.value - QUICK_GELU_ALPHA) < 1e-3 else None
        return fused[ops[0]]
    consts = [const_array(i) for n in nodes for i in n.inputs if i is not None and is_const(i)]
    scal = [float(c.ravel()[0]) for c in consts if c is not None and c.size == 1]

    def has(x: float) -> bool:  # a scalar constant of the formula (float16 graphs store it rounded)
        return any(abs(s - x) <= 1e-3 * abs(x) for s in scal)

    if "Erf" in ops and set(ops) <= {"Erf", "Div", "Mul", "Add"} and len(ops) <= 5 \
            and (has(math.sqrt(2.0)) or has(1 / math.sqrt(2.0))):
        return "gelu"
    if "Tanh" in ops and set(ops) <= {"Tanh", "Pow", "Mul", "Add"} and has(GELU_TANH_CUBIC):
        return "gelu_tanh"
    if ops == ["Mul", "Mul", "Sigmoid"] or ops == ["Mul", "Sigmoid"]:
        if any(abs(s - QUICK_GELU_ALPHA) < 1e-3 for s in scal):
            return "quick_gelu"
        if ops == ["Mul", "Sigmoid"] and not consts and _is_silu(nodes):
            return "silu"
    return None


def _is_silu(nodes: list[ir.Node]) -> bool:
    """x * Sigmoid(x) on one tensor x (torch's SiLU export)."""
    sig = next(n for n in nodes if n.op_type == "Sigmoid")
    mul = next(n for n in nodes if n.op_type == "Mul")
    return sig.outputs[0] in mul.inputs and sig.inputs[0] in mul.inputs


def _activation_subgraph(hidden: ir.Value) -> tuple[list[ir.Node], Optional[Linear], str]:
    """Walk back from fc2's input through elementwise activation ops to the fc1 projection.
    Returns (activation nodes incl. a possible fc1 bias Add, the fc1 projection, why-not if it failed)."""
    seen: dict[int, ir.Node] = {}
    sources: dict[int, Linear] = {}
    stack = [hidden]
    while stack:
        v = stack.pop()
        if is_const(v):
            continue
        p = v.producer()
        if p is None:
            return [], None, "reached a graph input"
        lin = linear_at(v)
        if lin is not None:
            sources[id(lin.node)] = lin
            continue
        if p.op_type not in _ACT_OPS or p.domain not in ("", "ai.onnx", "com.microsoft"):
            return [], None, f"{node_label(p)} is not an elementwise GELU-family op"
        if id(p) in seen:
            continue
        seen[id(p)] = p
        if len(seen) > _MAX_ACT_NODES:
            return [], None, "too many nodes for an activation"
        stack.extend(i for i in p.inputs if i is not None)
    if len(sources) != 1:
        return [], None, f"{len(sources)} MatMul sources"
    return list(seen.values()), next(iter(sources.values())), ""


def _follow_to_residual(down: ir.Value, D: int) -> Optional[ir.Node]:
    """From fc2's output through an optional bias Add and LayerScale Mul to the residual Add or fused
    SkipLayerNormalization."""
    v = down
    for _ in range(4):
        uses = list(v.uses())
        if len(uses) != 1:
            return None
        node = uses[0].node
        if node.op_type == "SkipLayerNormalization" and uses[0].idx in (0, 1):
            return node
        if node.op_type in ("Add", "Mul") and node.domain in ("", "ai.onnx"):
            other = node.inputs[1 - uses[0].idx]
            if is_const(other):
                v = node.outputs[0]
                continue
            if node.op_type == "Add":
                return node
        if node.op_type in PASS_THROUGH:
            v = node.outputs[0]
            continue
        return None
    return None


def _ancestors(v: ir.Value, limit: int = 200000) -> set[int]:
    out: set[int] = set()
    stack = [v]
    while stack and len(out) < limit:
        x = stack.pop()
        if id(x) in out:
            continue
        out.add(id(x))
        p = x.producer()
        if p is not None:
            stack.extend(i for i in p.inputs if i is not None)
    return out


def block_output(site: MlpSite) -> ir.Value:
    """The residual stream after the block (exposes SkipLayerNormalization's optional sum output)."""
    j = site.joins
    if j.op_type == "SkipLayerNormalization":
        if len(j.outputs) < 4:
            j.resize_outputs(4)
            for o in j.outputs[1:3]:
                if o.name is None and not o.uses():
                    o.name = ""  # absent optional output
        out = j.outputs[3]
        if not out.name:
            out.name = f"{j.name or 'skip_ln'}_sum_vit_surgery"
        return out
    return j.outputs[0]


def _residual_inputs(v: ir.Value) -> Optional[tuple[ir.Value, ir.Value, ir.Node]]:
    """(skip, branch, node) for a residual sum value: an Add's output or a SkipLayerNormalization's sum."""
    p = v.producer()
    if p is None:
        return None
    if p.op_type == "Add" and p.domain in ("", "ai.onnx") or (p.op_type == "SkipLayerNormalization"
                                                              and v is (p.outputs[3] if len(p.outputs) > 3 else None)):
        a, b = p.inputs[0], p.inputs[1]
        if a is None or b is None or is_const(a) or is_const(b):
            return None
        if id(a) in _ancestors(b):
            return a, b, p
        if id(b) in _ancestors(a):
            return b, a, p
    return None


def _continues_stream(prev: MlpSite, site: MlpSite) -> bool:
    """Does `site`'s MLP join a residual stream that continues `prev`'s (block output -> + attention ->
    MLP join)? An attention-pool head's MLP joins the pooled latent's own stream instead."""
    pair = [i for i in site.joins.inputs[:2] if i is not None]
    mid = next((i for i in pair if id(site.down) not in _ancestors(i)), None)
    p = mid.producer() if mid is not None else None  # the attention residual: Add or fused SkipLayerNorm
    prev_out = block_output(prev)
    return p is not None and any(v is prev_out for v in p.inputs[:2])


def _stream_before_block0(site: MlpSite) -> tuple[ir.Value, list[str]]:
    """The stream tensor entering block 0 (before its attention), moved before a pre-norm if any."""
    j = site.joins
    pair = [i for i in j.inputs[:2] if i is not None]
    mid = next((i for i in pair if id(site.down) not in _ancestors(i)), None)
    if mid is None:
        raise ModelInputError(f"block 0: cannot tell the residual stream at {node_label(j)}")
    if mid.producer() is not None and mid.producer().op_type == "SkipLayerNormalization" \
            and (len(mid.producer().outputs) < 4 or mid is not mid.producer().outputs[3]):
        raise ModelInputError(f"block 0: residual stream comes from a normalised output at {node_label(mid.producer())}")
    res = _residual_inputs(mid)
    if res is None:
        raise ModelInputError(f"block 0: no attention residual sum found at {node_label(mid.producer())}")
    x, _branch, _node = res
    notes = []
    p = x.producer()
    if p is not None and p.op_type == "LayerNormalization" and p.domain in ("", "ai.onnx"):
        notes.append(f"pre-norm {node_label(p)}: registers enter before it")
        x = p.inputs[0]
    elif p is not None and p.op_type in ("SkipLayerNormalization", "SimplifiedLayerNormalization"):
        raise ModelInputError(f"the pre-norm is fused with the positional-embedding Add at {node_label(p)}; "
                              "the register's entry point is inside it (export without that fusion)")
    return x, notes


def _unfuse_skip_layer_norm(graph: ir.Graph, node: ir.Node) -> None:
    """SkipLayerNormalization(a, b, gamma, beta, bias) -> s = a + b (+ bias); LayerNormalization(s): the same
    computation, with the sum a separate tensor so tokens can be inserted between the two."""
    if any(o.uses() for o in node.outputs[1:3]):
        raise ModelInputError(f"{node_label(node)}: its mean / inv-std outputs are used; cannot un-fuse it")
    ins = list(node.inputs) + [None] * (5 - len(node.inputs))
    a, b, gamma, beta, bias = ins[:5]
    eps = node.attributes.get("epsilon")
    new: list[ir.Node] = []
    add = ir.Node("", "Add", [a, b], name=f"{node.name}/unfused_add")
    new.append(add)
    s = add.outputs[0]
    if bias is not None:
        add_b = ir.Node("", "Add", [s, bias], name=f"{node.name}/unfused_bias")
        new.append(add_b)
        s = add_b.outputs[0]
    attrs = [ir.AttrInt64("axis", -1), ir.AttrFloat32("epsilon", eps.value if eps is not None else 1e-12)]
    ln = ir.Node("", "LayerNormalization", [s, gamma] + ([beta] if beta is not None else []), attrs,
                 name=f"{node.name}/unfused_layer_norm")
    new.append(ln)
    s.name = f"{node.name}/sum"
    ln.outputs[0].name = f"{node.name}/normalised"
    graph.insert_before(node, new)
    for old, repl in ((node.outputs[0], ln.outputs[0]), (node.outputs[3] if len(node.outputs) > 3 else None, s)):
        if old is None:
            continue
        was_output = old.is_graph_output()
        for u in list(old.uses()):
            u.node.replace_input_with(u.idx, repl)
        if was_output:
            graph.outputs[[o is old for o in graph.outputs].index(True)] = repl
            repl.name, old.name = old.name, f"{old.name}_fused_unused"
    graph.remove(node, safe=True)


def _unfuse_before_block0(graph: ir.Graph, site: "MlpSite") -> list[str]:
    """Fused SkipLayerNormalization nodes in the embedding (positional Add + first norm) are split, so
    the register entry point exists as a tensor. The attention residual of block 0 stays fused."""
    j = site.joins
    pair = [i for i in j.inputs[:2] if i is not None]
    mid = next((i for i in pair if id(site.down) not in _ancestors(i)), None)
    keep = mid.producer() if mid is not None else None
    done = []
    anc = _ancestors(site.fc1.x)
    for node in list(graph):
        if node.op_type == "SkipLayerNormalization" and node is not keep and node is not j \
                and any(id(o) in anc for o in node.outputs):
            done.append(f"un-fused {node_label(node)} (positional-embedding Add + LayerNorm)")
            _unfuse_skip_layer_norm(graph, node)
    return done


def _patch_conv(graph: ir.Graph) -> ir.Node:
    x = graph.inputs[0]
    frontier = [x]
    for _ in range(4):
        nxt = []
        for v in frontier:
            for u in v.uses():
                if u.node.op_type in ("Conv", "ConvInteger"):  # ConvInteger: quantize_dynamic's
                    return u.node
                if u.node.op_type in ("Cast", "Identity", "Div", "Sub", "Mul", "DynamicQuantizeLinear"):
                    nxt.append(u.node.outputs[0])
        frontier = nxt
    raise ModelInputError(f"no patch-embedding Conv found on the graph input '{x.name}'")


def load_ir(path: str | Path) -> ir.Model:
    p = Path(path)
    require_onnx_path(p)
    prescan_onnx(p)  # nesting, tensor sizes and external data, before the parser builds the graph
    try:
        model = ir.load(str(p))
    except Exception as e:  # DecodeError, OSError, bad external-data reference
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelInputError(f"{p}: not a readable ONNX model ({type(e).__name__}: {first})") from None
    return model


def _mlp_site(node: ir.Node, index: int, after: Optional[ir.Value] = None) -> tuple[Optional[MlpSite], Optional[str]]:
    """`node` as the end of an MLP's down projection (a Linear <- GELU <- Linear with constant weights,
    joining a residual stream): (the site numbered `index`, None); (None, None) when it is no MLP's down
    projection, or one that joins no residual stream downstream of `after` (the blocks' output so far: a
    VLM's multimodal projector); a refusal text when it is one vit-surgery cannot rewrite."""
    fc2 = linear_at(node.outputs[0]) if node.op_type in ("MatMul", "MatMulNBits", "Mul") else None
    if fc2 is None:
        return None, None
    H, D = fc2.in_dim, fc2.out_dim
    hidden = fc2.x
    parts = gated_parts(hidden, H, D)
    if parts is not None:
        return _gated_site(parts, fc2, index)
    act_nodes, fc1, why = _activation_subgraph(hidden)
    if fc1 is None or not act_nodes:
        return None, None  # attention projections, heads: not an MLP's down projection
    if fc1.out_dim != H or fc1.in_dim != D:
        return None, None
    pre = fc1.y
    bias_add = None
    users = [u.node for u in pre.uses()]
    if len(users) == 1 and users[0].op_type == "Add" and users[0] in act_nodes:
        other = users[0].inputs[1 - [i is pre for i in users[0].inputs].index(True)]
        b = const_array(other)
        if b is not None and b.size == H:
            bias_add = users[0]
            pre = users[0].outputs[0]
    acts = [n for n in act_nodes if n is not bias_add]
    kind = _classify(acts)
    if kind is None:
        return None, (f"MLP at {fc1.label} -> {fc2.label}: activation "
                      f"[{', '.join(sorted(n.op_type for n in acts))}] at {node_label(hidden.producer())} is not a "
                      "recognised GELU (Gelu, erf GELU, tanh GELU, QuickGELU, FastGelu)")
    refusal = None
    for a in acts:  # every use of an inner value must stay inside the activation
        for o in a.outputs:
            if o is not hidden and any(u.node not in acts for u in o.uses()):
                refusal = refusal or f"activation value at {node_label(a)} is used outside the MLP"
    joins = _follow_to_residual(fc2.y, D)
    if joins is None and after is not None and not refusal and id(after) in _ancestors(fc1.x):
        return None, None  # after the blocks, feeding no stream: a projector (head), left as it is
    if joins is None:
        return None, refusal or (f"MLP output of {fc2.label} does not join a residual stream "
                                 "(Add or SkipLayerNormalization)")
    return MlpSite(index, fc1, bias_add, acts, kind, pre, hidden, fc2, fc2.y, joins), refusal


def _gated_site(parts: GatedParts, fc2: Linear, index: int) -> tuple[Optional[MlpSite], Optional[str]]:
    """The MlpSite of a gated MLP (`gated.py`), or a refusal naming where it stops."""
    kind = _classify(parts.act_nodes)
    where = f"gated MLP at {describe_chunk(parts)} -> {fc2.label}"
    if kind is None:
        return None, (f"{where}: gate activation [{', '.join(sorted(n.op_type for n in parts.act_nodes))}] at "
                      f"{node_label(parts.product)} is not a recognised SiLU / GELU")
    if any(n.op_type in ("FastGelu", "BiasGelu") for n in parts.act_nodes):
        return None, f"{where}: a fused biased gate activation is not supported"
    inner = parts.act_nodes + [parts.product]
    refusal = None
    for a in parts.act_nodes:  # every use of an inner value must stay inside the MLP
        for o in a.outputs:
            if any(u.node not in inner for u in o.uses()):
                refusal = refusal or f"{where}: activation value at {node_label(a)} is used outside the MLP"
    joins = _follow_to_residual(fc2.y, fc2.out_dim)
    if joins is None:
        return None, refusal or (f"MLP output of {fc2.label} does not join a residual stream "
                                 "(Add or SkipLayerNormalization)")
    g, u = parts.gate, parts.up
    return MlpSite(index, g.linear, g.bias_add, parts.act_nodes, kind, g.value, fc2.x, fc2, fc2.y,
                   joins, up=u.value, fc1_up=None if parts.packed else u.linear,
                   layout="packed" if parts.packed else "separate"), refusal


def recognise(path: str | Path, model: Optional[ir.Model] = None) -> VitGraph:
    """Find blocks, MLPs, the residual stream and the register entry point in an ONNX ViT."""
    model = model if model is not None else load_ir(path)
    graph = model.graph
    if len(graph.inputs) != 1:
        raise ModelInputError(f"{path}: expected one image input, the graph has {len(graph.inputs)} "
                              f"({[i.name for i in graph.inputs]})")
    if any(n.op_type in ("If", "Loop", "Scan") for n in graph):
        bad = next(n for n in graph if n.op_type in ("If", "Loop", "Scan"))
        raise ModelInputError(f"{path}: control flow is not supported: stopped at {node_label(bad)}")
    sites: list[MlpSite] = []
    first_refusal: Optional[str] = None
    for node in graph:  # topological order
        site, refusal = _mlp_site(node, len(sites), block_output(sites[-1]) if sites else None)
        first_refusal = first_refusal or refusal
        if site is not None:
            sites.append(site)
    if first_refusal:
        raise ModelInputError(f"{path}: unsupported ViT graph: {first_refusal}")
    if not sites:
        mm = next((n for n in graph if n.op_type in ("MatMul", "Gemm")), None)
        raise ModelInputError(f"{path}: no transformer MLP (MatMul -> GELU -> MatMul with constant weights) "
                              f"found; first matrix multiply: {node_label(mm)}")
    head = []
    while len(sites) > 1 and not _continues_stream(sites[-2], sites[-1]):
        head.append(sites.pop())  # an attention-pool head's MLP (SigLIP's MAP): not a transformer block
    dims = {s.fc2.out_dim for s in sites}
    if len(dims) != 1:
        raise ModelInputError(f"{path}: MLPs of different widths {sorted(dims)}: stopped at {sites[-1].fc2.label}")
    for a, b in zip(sites, sites[1:]):  # each block reads the previous one's stream
        if id(block_output(a)) not in _ancestors(b.down):
            raise ModelInputError(f"{path}: block {b.block} at {b.fc1.label} does not read block {a.block}'s "
                                  "output: not one residual stream")
    unfused = _unfuse_before_block0(graph, sites[0])
    entry, notes = _stream_before_block0(sites[0])
    notes = unfused + notes + [f"MLP {h.fc1.label} -> {h.fc2.label} is in the head (its residual stream is not "
                               "the blocks'): left as it is" for h in reversed(head)]
    conv = _patch_conv(graph)
    return VitGraph(model, Path(path), sites, entry, conv, dims.pop(), graph.inputs[0].name, notes)
