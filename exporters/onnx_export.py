"""ONNX export of a baked model: torch's exporters (dynamo, then legacy), the interface fixed to
`VIT_ONNX_SPEC`, metadata properties added, weights in external data when over the protobuf limit.

The fix is inside the graph: the register tokens are a constant and the register-neuron edit is
ordinary ops (argmax / gather / concat), no hooks. Validation is `onnx_validate`; moving the validated
file into place is `onnx_publish.export_and_validate`.

Numerics of the register token. On an image without outliers the register neurons' signed max lies in
the activation's far negative tail (QuickGELU(-6) ~ -2e-4), where float32 activation kernels disagree by
1e-4 to 1e-2 relative (onnxruntime's sigmoid and PyTorch's CPU erf are approximations accurate in
absolute, not relative terms). So the exported graph computes the register branch's activation (the k
register units only) in a form accurate in that tail, in float32: x * sigmoid(z) with the sigmoid from
one exp(-|z|) (exporters/tail_accurate_activation.py; QuickGELU, SiLU, tanh GELU; exact GELU stays as
it is). The graph has no float64 node (onnxruntime fuses a float64 QuickGELU into a kernel that has
float kernels only), so it loads in every onnxruntime the project supports, at every optimisation
level, and in transformers.js. The PyTorch model is unchanged.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from surgery.core.errors import ModelInputError, SurgeryError, first_line

from .onnx_metadata import build_metadata
from .onnx_patches import ExportWrapper, mha_fastpath_disabled
from .register_branch_export import split_register_branches
from .tail_accurate_activation import tail_accurate_register_branches
from surgery.core.output_format import META_PREFIX, ONNX_FILE
from surgery.core.output_format import ONNX_DATA_FILE as DATA_FILE
from surgery.core.progress import say_if

from .onnx_spec import EXPORTERS, EXTERNAL_DATA_THRESHOLD, VIT_ONNX_SPEC, OnnxSpec, log


def export_proto(wrapper: nn.Module, example: torch.Tensor, spec: OnnxSpec, exporter: str, scratch: Path,
                  progress: bool) -> Any:
    """Run one torch exporter; return the ModelProto (weights in memory)."""
    import onnx

    sink = sys.stderr if progress else io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # TracerWarnings, the legacy exporter's DeprecationWarning
        stack.enter_context(contextlib.redirect_stdout(sink))  # the dynamo exporter prints its steps
        stack.enter_context(mha_fastpath_disabled())
        stack.enter_context(torch.no_grad())
        if exporter == "dynamo":
            prog = torch.onnx.export(wrapper, (example,), None, input_names=spec.input_names,
                                     output_names=spec.output_names, opset_version=spec.opset, dynamo=True,
                                     dynamic_shapes=spec.dynamic_shapes(), verbose=False, optimize=True)
            return prog.model_proto
        raw = scratch / "legacy-export.onnx"
        torch.onnx.export(wrapper, (example,), str(raw), input_names=spec.input_names,
                          output_names=spec.output_names, opset_version=spec.opset, dynamo=False,
                          dynamic_axes=spec.dynamic_axes(), do_constant_folding=True)
        proto = onnx.load(str(raw), load_external_data=True)
        for f in scratch.iterdir():
            if f.name != ONNX_FILE and f.name != DATA_FILE:
                f.unlink()
        return proto


def fix_io_shapes(proto: Any, spec: OnnxSpec, shapes: dict[str, Sequence[int]]) -> None:
    """Dynamic axes get their spec name, every other axis its concrete size (some exporters leave
    generated names on fixed axes)."""
    by_name = {t.name: t for t in spec.inputs + spec.outputs}
    for vi in list(proto.graph.input) + list(proto.graph.output):
        t = by_name.get(vi.name)
        if t is None or vi.name not in shapes:
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(shapes[vi.name]):
            continue
        for i, d in enumerate(dims):
            if i in t.dynamic:
                d.ClearField("dim_value")
                d.dim_param = t.axes[i]
            else:
                d.ClearField("dim_param")
                d.dim_value = int(shapes[vi.name][i])


def _weights_bytes(proto: Any) -> int:
    import numpy as np
    from onnx import helper

    total = 0
    for t in proto.graph.initializer:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        try:
            total += n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            total += len(t.raw_data)
    return total


def save_proto(proto: Any, path: Path, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024, convert_attribute=False)
    else:
        onnx.save_model(proto, str(path))


@dataclass
class ExportInfo:
    path: Path
    exporter: str
    dtype: str
    external_data: bool
    weights_bytes: int


@dataclass
class GraphExport:
    proto: Any  # onnx.ModelProto, weights in memory
    exporter: str  # the exporter that produced it
    shapes: dict[str, tuple[int, ...]]  # input/output shapes at the export batch
    tail_accurate_branches: list[str]  # RegisterMlps whose branch activation is the tail-accurate form


def export_first_that_works(wrapper: nn.Module, example: torch.Tensor, spec: OnnxSpec, exporter: str,
                            scratch: Path, model: nn.Module, progress: bool, *, what: str = "the model",
                            detail: str = "") -> tuple[Any, str, list[str]]:
    """Export `wrapper` with `exporter`, then with the other one if it fails (each exporter has its own
    gaps): (proto, the exporter used, the RegisterMlps of `model` exported in the tail-accurate form).
    All failing is one ModelInputError naming each exporter's error; our own errors pass through."""
    order = [exporter] + [e for e in EXPORTERS if e != exporter]
    errors: list[str] = []
    for name in order:
        say_if(progress, f"exporting {what} with the {name} exporter{detail}")
        try:
            with split_register_branches(model), tail_accurate_register_branches(model) as tail_branches:
                proto = export_proto(wrapper, example, spec, name, scratch, progress)
        except SurgeryError:
            raise
        except Exception as e:  # noqa: BLE001 - the next exporter may cover it; all errors are reported
            errors.append(f"{name}: {type(e).__name__}: {first_line(e)}")
            log.warning("the %s ONNX exporter failed (%s)%s", name, errors[-1],
                        "; trying the next one" if name != order[-1] else "")
            continue
        return proto, name, tail_branches
    raise ModelInputError(f"could not export {what} to ONNX: " + "; ".join(errors))


def replace_metadata(proto: Any, entries: dict[str, str], drop_prefix: str | None = None) -> None:
    """Set `entries` as the proto's metadata_props, replacing the same keys (and, with `drop_prefix`,
    every key starting with it); other properties stay as they are."""
    kept = [p for p in proto.metadata_props
            if p.key not in entries and not (drop_prefix and p.key.startswith(drop_prefix))]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for k, v in entries.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def export_graph(model: nn.Module, family: Any, scratch: Path, *, fp16: bool = False, exporter: str = "dynamo",
                 spec: OnnxSpec = VIT_ONNX_SPEC, progress: bool = True) -> GraphExport:
    """Export any model a family adapter runs (baked or not) as `spec` describes: `family.forward_both`
    wrapped in a module, batch `spec.export_batch_size`, dynamic batch axis, MHA fast path off. The
    `exporter` is tried first, the other one if it fails. `scratch` is an empty working folder."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    dtype = torch.float16 if fp16 else torch.float32
    ref = next(model.parameters())
    c, h, w = family.input_size(model)
    if ref.device.type != "cpu" or ref.dtype != dtype:
        model = copy.deepcopy(model).to("cpu", dtype)  # export on CPU; the graph is device-independent
    model.eval()
    wrapper = ExportWrapper(model, family, dtype).eval()
    example = torch.randn(spec.export_batch_size, c, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), mha_fastpath_disabled():
        pooled, tokens = wrapper(example)
    shapes = {spec.input_names[0]: tuple(example.shape), spec.output_names[0]: tuple(pooled.shape),
              spec.output_names[1]: tuple(tokens.shape)}
    proto, name, tail_branches = export_first_that_works(
        wrapper, example, spec, exporter, scratch, model, progress,
        detail=f" (opset {spec.opset}, {'float16' if fp16 else 'float32'}, batch {spec.export_batch_size})")
    fix_io_shapes(proto, spec, shapes)
    return GraphExport(proto, name, shapes, tail_branches)


def export_onnx(loaded: Any, out_dir: Path, scratch: Path, *, fp16: bool = False, exporter: str = "dynamo",
                spec: OnnxSpec = VIT_ONNX_SPEC, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
                progress: bool = True) -> ExportInfo:
    """Export `loaded` (a baked LoadedModel) to `scratch/model.onnx` (+ model.onnx.data when the weights
    exceed `external_data_threshold` bytes), with vit-surgery's metadata properties."""
    if loaded.recipe is None:
        raise ModelInputError(f"{loaded.spec} carries no baked test-time registers (not a vit-surgery output)")
    g = export_graph(loaded.model, loaded.adapter, scratch, fp16=fp16, exporter=exporter, spec=spec,
                     progress=progress)
    proto, used, tail_branches = g.proto, g.exporter, g.tail_accurate_branches
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 17:
        raise ModelInputError(f"the exporter produced opset {opset}; ONNX export needs opset >= 17")
    meta = build_metadata(loaded, out_dir, dtype="float16" if fp16 else "float32", exporter=used, spec=spec,
                          num_tokens=int(g.shapes[spec.output_names[1]][1]))
    meta[META_PREFIX + "tail_accurate_register_branch"] = json.dumps(tail_branches)
    replace_metadata(proto, meta, drop_prefix=META_PREFIX)
    proto.doc_string = ("vit-surgery baked model with test-time registers inside the graph; "
                        "inputs/outputs and recipe in metadata_props (vit_surgery.*)")
    size = _weights_bytes(proto)
    external = size > external_data_threshold
    path = scratch / ONNX_FILE
    save_proto(proto, path, external)
    return ExportInfo(path, used, "float16" if fp16 else "float32", external, size)

