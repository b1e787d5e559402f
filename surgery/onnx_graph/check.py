"""Check a rewritten ONNX model against a hooked reference built on the source ONNX graph.

The reference is the paper's hook expressed in the source graph, without splitting any weight: R zero
tokens enter at the recognised entry point, and in each listed block the MLP's post-activation units are
overwritten in place (`reference.py`'s index_select -> register_edit -> index_copy): the register
units are gathered, their signed max is taken with ReduceMax/ReduceMin (not the bake's ArgMax), patch
rows are zeroed, and the edited units are put back with a 0/1 mask and a one-hot MatMul (exact). Both
models run in onnxruntime (CPU, optimisation level ALL) at several batch sizes; the error of each output
is parity's (max over feature vectors of ||rewritten - reference|| / ||reference||).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx_ir as ir
import torch

from ..core.errors import ModelInputError
from ..core.onnx_runtime import RUNTIME_DETAIL, open_session
from ..core.output_format import FP32_TOLERANCE, OnnxMetadata
from ..core.parity import OutputError
from ..core.recipe import Recipe
from ..core.verdict import verdict_word
from .bake import (NodeBuilder, insert_registers, remake_side_tensors, replace_uses, shift_token_constants,
                   side_tensors, pool_without_registers)
from .discover import TokenLayout, measure_layout, static_input_size
from .precision import precision_of, tolerance_for
from .recognise import load_ir, recognise
from .runtime import ExposedSession
from .unit_activation import unit_activation
from .vision_encoder import drop_register_rows, is_vision_encoder, source_outputs



def _reduce(b: NodeBuilder, op: str, x: ir.Value, axes: list[int], opset: int) -> ir.Value:
    if opset >= 18:
        return b.op(op, [x, b.i64("axes", axes)], {"keepdims": 1})
    return b.op(op, [x], {"axes": axes, "keepdims": 1})


def _hooked_units(b: NodeBuilder, h: ir.Value, sel: ir.Value, units: list[int], H: int, p: int, R: int,
                  scale: float, per_neuron: bool, opset: int, h_dtype: np.dtype) -> ir.Value:
    """h with the register units (`sel` = their activations [B, N, k], float32) edited in place."""
    k = len(units)
    f32 = np.float32
    axes = [1] if per_neuron else [1, 2]
    mx = _reduce(b, "ReduceMax", sel, axes, opset)
    mn = _reduce(b, "ReduceMin", sel, axes, opset)
    signed = b.op("Where", [b.op("GreaterOrEqual", [mx, b.op("Neg", [mn])]), mx, mn])
    if scale != 1.0:
        signed = b.op("Mul", [signed, b.const("scale", np.asarray(scale, dtype=f32))])
    reg = b.op("Expand", [signed, b.i64("rk", [1, R, k])])
    axis1 = b.i64("axis1", [1])
    prefix = b.op("Slice", [sel, b.i64("s", [0]), b.i64("e", [p]), axis1])
    rest = b.op("Slice", [sel, b.i64("s", [p + R]), b.i64("e", [np.iinfo(np.int64).max]), axis1])
    zeros = b.op("Mul", [rest, b.const("zero", np.zeros((), dtype=f32))])  # exact zeros, same shape
    edited = b.op("Concat", [prefix, reg, zeros], {"axis": 1})  # [B, N, k]
    if np.dtype(h_dtype) != f32:
        edited = b.op("Cast", [edited], {"to": ir.DataType.from_numpy(np.dtype(h_dtype))})
    keep = np.ones(H, dtype=h_dtype); keep[units] = 0
    onehot = np.zeros((k, H), dtype=h_dtype); onehot[np.arange(k), units] = 1
    return b.op("Add", [b.op("Mul", [h, b.const("keep", keep)]), b.op("MatMul", [edited, b.const("onehot", onehot)])])


def hooked_reference_graph(source: str | Path, recipe: Recipe, layout: Optional[TokenLayout] = None) -> ir.Model:
    """The source ONNX model with the test-time-register hooks written into it (see module doc)."""
    vit = recognise(source)
    layout = layout or measure_layout(vit)
    side = side_tensors(vit, layout)
    vlm = source_outputs(vit.model, static_input_size(vit), str(source)) if is_vision_encoder(vit.model) else None
    graph = vit.model.graph
    opset = vit.model.opset_imports.get("", 17)
    b = NodeBuilder(graph, "vit_surgery_reference")
    R, p = recipe.num_registers, layout.num_prefix
    dtype = np.dtype(layout.dtype)
    entry = insert_registers(b, vit, layout, R, dtype)
    for block, units in recipe.neurons.items():
        site = vit.mlps[block]
        before = len(b.nodes)
        idx = list(units)
        # the hooked units' activation, recomputed as the bake does (accurate in the far tail: unit_activation)
        sel = unit_activation(b, site, np.asarray(idx), dtype)
        new_h = _hooked_units(b, site.hidden, sel, idx, site.width, p, R, recipe.scale,
                              recipe.mode == "per_neuron", opset, dtype)
        replace_uses(site.hidden, new_h, {id(n) for n in b.nodes[before:]})
    own = {id(n) for n in b.nodes}
    b.commit()
    _, head = pool_without_registers(b, vit, layout, R)
    b.commit_new()
    shift_token_constants(b, entry, layout, R, own, vit.embed_dim, head)
    remake_side_tensors(b, side, layout, R)
    graph.sort()
    if vlm is not None:  # as the bake does: image_features keep the source's token count
        b.commit_new()
        drop_register_rows(b, vit.model, vlm, static_input_size(vit), p, R, f"hooked reference of {source}")
        b.commit_new()
        graph.sort()
    return vit.model


@dataclass
class OnnxCheckReport:
    path: str
    source: str
    tolerance: float
    batch_sizes: list[int] = field(default_factory=list)
    errors: dict[str, OutputError] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def worst(self) -> Optional[OutputError]:
        return max(self.errors.values(), key=lambda e: e.relative, default=None)

    @property
    def passed(self) -> bool:
        return not self.problems and all(e.within(self.tolerance) for e in self.errors.values())

    def summary(self) -> str:
        head = f"onnx check {verdict_word(self.passed)}"
        if self.problems:
            return f"{head}: {self.problems[0]}"
        w = self.worst
        if w is None:
            return f"{head}: nothing compared"
        return (f"{head}: {self.path} vs the hooked reference on {self.source} "
                f"at batch sizes {self.batch_sizes}; worst relative error {w.relative:.2e} ({w.name}) "
                f"<= {self.tolerance:g}" if self.passed else
                f"{head}: worst relative error {w.relative:.2e} ({w.name} at {w.where}) > {self.tolerance:g}")

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "path": self.path, "source": self.source, "tolerance": self.tolerance,
                "batch_sizes": self.batch_sizes, "problems": self.problems,
                "relative_error_definition": "max over feature vectors of ||rewritten - reference|| / ||reference||",
                "reference": "source ONNX graph with the test-time-register hooks written in (no weight split)",
                "runtime": RUNTIME_DETAIL,
                "outputs": {k: {"relative": e.relative, "max_abs": e.max_abs, "where": list(e.where)}
                            for k, e in self.errors.items()},
                "summary": self.summary()}


def read_recipe(path: str | Path) -> Recipe:
    meta = OnnxMetadata.from_props(dict(load_ir(path).metadata_props), str(path))
    if meta.recipe is None:
        raise ModelInputError(f"{path}: no vit_surgery.recipe metadata (not written by `vit-surgery convert`)")
    try:
        return Recipe.from_dict(meta.recipe, source=f"{path} metadata")
    except ValueError:
        raise ModelInputError(f"{path}: metadata vit_surgery.recipe is malformed") from None


@torch.no_grad()
def check_onnx(baked: str | Path, source: str | Path, batches: list[torch.Tensor], *,
               tolerance: float = FP32_TOLERANCE, recipe: Optional[Recipe] = None) -> OnnxCheckReport:
    """Run the rewritten model and the hooked reference graph on `batches`; compare every output."""
    baked, source = Path(baked), Path(source)
    recipe = recipe or read_recipe(baked)
    src_vit = recognise(source)
    layout = measure_layout(src_vit)
    # --tolerance is fp32's; a float16 / quantized source is allowed at least its precision's (precision.py)
    report = OnnxCheckReport(str(baked), str(source), tolerance_for(precision_of(src_vit, layout), tolerance))
    report.metadata = OnnxMetadata.from_props(dict(load_ir(baked).metadata_props), str(baked)).as_dict()
    want_regs = list(range(layout.num_prefix, layout.num_prefix + recipe.num_registers))
    if report.metadata.get("register_token_indices") not in (None, want_regs):
        report.problems.append(f"{baked.name} records register tokens at {report.metadata['register_token_indices']}, "
                               f"the source's layout puts them at {want_regs}")
    sess = open_session(baked)
    ref_model = hooked_reference_graph(source, recipe, layout)
    ref = ExposedSession(ref_model, [], f"hooked reference of {source}")
    names = [o.name for o in sess.get_outputs()]
    if names != ref.output_names:
        report.problems.append(f"{baked.name} has outputs {names}, the source has {ref.output_names}")
        return report
    report.errors = {n: OutputError(n) for n in names}
    offset = 0
    try:
        for pixels in batches:
            x = pixels.float().numpy()
            got = sess.run_pixels(names, x)
            want, _ = ref.run(x)
            for n, g, w in zip(names, got, want):
                if g.shape != w.shape:
                    report.problems.append(f"output {n} has shape {list(g.shape)}, the reference {list(w.shape)}")
                    return report
                report.errors[n].update(torch.from_numpy(np.asarray(g)), torch.from_numpy(np.asarray(w)), offset=offset)
            offset += len(x)
            report.batch_sizes.append(len(x))
    finally:
        ref.close()
    return report
