"""ONNX export of a baked model, validated in onnxruntime against PyTorch and the hooked reference.

`export_and_validate(OUT, loaded=...)` takes the baked model in OUT as loaded by the caller, exports
`OUT/model.onnx` and validates it before moving it into place; `validate_onnx` is the validation step
alone (also run by `vit-surgery check`). The fix is inside the graph: the register tokens are a
constant and the register-neuron edit is ordinary ops (argmax / gather / concat), no hooks.

Graph interface (declared once, in `VIT_ONNX_SPEC`):
  input  pixel_values  float32 [batch, 3, H, W]    (preprocessed as the model's own transform does)
  output pooled        float32 [batch, E]          (the family's pooled embedding / head output)
  output tokens        float32 [batch, N, D]       (final normalised tokens, register tokens included)
Only the batch axis is dynamic. An `--fp16` export computes in float16 inside the graph but keeps this
float32 interface. The recipe and token layout are in the model's metadata properties
(`read_onnx_metadata`). Weights go to `model.onnx.data` (external data) when they would push the
protobuf past its 2 GB limit.

Validation (onnx.checker, then onnxruntime on the CPU provider with graph optimisation level ALL):
every output is judged against the hooked reference on the un-baked source run in float64, at batch
sizes that include one different from the export batch, by the same rule as `check`
(surgery/judge.py): per feature vector, relative error ||onnx - reference|| / ||reference||, allowed
`tolerance x max(1, conditioning / median conditioning)` where a vector's conditioning is measured on
the float64 run under seeded float32-sized noise. So neither onnxruntime's nor PyTorch's float32
kernels decide the verdict, and noise on one ill-conditioned vector (the register token of an image
without outliers) cannot excuse an error on another. Tolerances: FP32_TOLERANCE (1e-5) for float32
exports, FP16_TOLERANCE (2e-2) for float16 exports (float16 keeps 11 significant bits, unit roundoff
4.9e-4; a dozen residual blocks accumulate a few times 1e-3 against the float32 model).

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
import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from surgery import __version__
from surgery.core.errors import ModelInputError, ParityError, SurgeryError, first_line
from surgery.core.parity import JUDGE, OutputError

from .tail_accurate_activation import tail_accurate_register_branches

log = logging.getLogger("vit-surgery")

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # external weights, next to model.onnx, only for models over the limit
META_PREFIX = "vit_surgery."
FORMAT_VERSION = "1"
FP32_TOLERANCE = 1e-5
FP16_TOLERANCE = 2e-2
# Protobuf cannot serialise a message of 2 GiB or more; weights above this go to external data.
EXTERNAL_DATA_THRESHOLD = 2**31 - 64 * 2**20
EXPORTERS = ("dynamo", "legacy")


# ---- the graph interface, declared once ----------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, axis names, which axes are dynamic, what it holds."""

    name: str
    axes: tuple[str, ...]
    dynamic: tuple[int, ...] = (0,)
    doc: str = ""


@dataclass(frozen=True)
class OnnxSpec:
    """Inputs, outputs, dynamic axes and opset of the exported graph (optimum-style export config)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int = 18
    export_batch_size: int = 2  # never 1: exporters may specialise a batch of 1 into the graph

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """For the TorchScript (legacy) exporter."""
        return {t.name: {i: t.axes[i] for i in t.dynamic} for t in self.inputs + self.outputs}

    def dynamic_shapes(self) -> dict[str, dict[int, Any]]:
        """For the torch.export (dynamo) exporter: one Dim per axis name, shared by every tensor."""
        dims: dict[str, Any] = {}
        out: dict[str, dict[int, Any]] = {}
        for t in self.inputs:
            out[t.name] = {}
            for i in t.dynamic:
                name = t.axes[i]
                dims.setdefault(name, torch.export.Dim(name, min=1))
                out[t.name][i] = dims[name]
        return out

    def describe(self) -> dict[str, Any]:
        return {"inputs": {t.name: {"axes": list(t.axes), "dynamic": list(t.dynamic), "doc": t.doc}
                           for t in self.inputs},
                "outputs": {t.name: {"axes": list(t.axes), "dynamic": list(t.dynamic), "doc": t.doc}
                            for t in self.outputs}}


VIT_ONNX_SPEC = OnnxSpec(
    inputs=(TensorSpec("pixel_values", ("batch", "channels", "height", "width"),
                       doc="float32 images, preprocessed with the model's own transform"),),
    outputs=(TensorSpec("pooled", ("batch", "embed"), doc="pooled image embedding (head output)"),
             TensorSpec("tokens", ("batch", "sequence", "width"),
                        doc="final normalised token features: [prefix | test-time registers | patches]")),
)


class _ExportWrapper(nn.Module):
    """family.forward_both as a module with a float32 interface (fp16 exports cast inside the graph)."""

    def __init__(self, model: nn.Module, family: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.dtype = dtype

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, tokens = self.family.forward_both(self.model, pixel_values.to(self.dtype))
        return pooled.float(), tokens.float()


# ---- small helpers -----------------------------------------------------------------------------

@contextlib.contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    """open_clip's nn.MultiheadAttention fast path becomes aten::_native_multi_head_attention, which the
    exporters cannot translate; the ordinary path computes the same thing."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    prev = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(prev)


@contextlib.contextmanager
def _exact_torch() -> Iterator[None]:
    """No TF32 on CUDA while PyTorch outputs serve as references."""
    m, c = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = m, c


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"vit-surgery: {msg}", file=sys.stderr)


def _surgery_doc(out_dir: Path) -> dict[str, Any]:
    try:
        doc = json.loads((out_dir / "surgery.json").read_text(encoding="utf-8"))
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def token_layout(loaded: Any) -> dict[str, Any]:
    """Where the tokens of the `tokens` output come from (the baked model's own bookkeeping)."""
    from surgery.core.bake import register_token_indices

    fam, model = loaded.adapter, loaded.model
    regs = register_token_indices(model, adapter=fam)
    leading = fam.num_prefix_tokens(model)  # prefix + test-time registers in a baked model
    return {"num_prefix_tokens": leading - len(regs), "num_registers": len(regs), "register_indices": regs,
            "first_patch_index": leading, "order": "[prefix (CLS, trained registers) | test-time registers | patches]"}


def build_metadata(loaded: Any, out_dir: Path, *, dtype: str, exporter: str, spec: OnnxSpec,
                   num_tokens: int) -> dict[str, str]:
    """The metadata properties written into model.onnx (all values are strings; JSON where structured)."""
    doc = _surgery_doc(out_dir)
    layout = token_layout(loaded)
    layout["num_tokens"] = num_tokens
    cfg = dict(loaded.source.pretrained_cfg or {})
    preprocess = {k: cfg[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
                  if k in cfg}
    meta = {
        "format_version": FORMAT_VERSION,
        "recipe": json.dumps(loaded.recipe.to_dict(), sort_keys=True),
        "token_layout": json.dumps(layout, sort_keys=True),
        "register_token_indices": json.dumps(layout["register_indices"]),
        "num_prefix_tokens": str(layout["num_prefix_tokens"]),
        "num_registers": str(layout["num_registers"]),
        "source_model": str(doc.get("source_model") or loaded.spec),
        "source": json.dumps(doc.get("source", loaded.source.to_dict()), sort_keys=True, default=str),
        "family": loaded.adapter.name,
        "tool": "vit-surgery",
        "tool_version": __version__,
        "dtype": dtype,
        "exporter": f"torch {torch.__version__} {exporter}",
        "export_batch_size": str(spec.export_batch_size),
        "interface": json.dumps(spec.describe(), sort_keys=True),
        "preprocess": json.dumps(preprocess, sort_keys=True),
    }
    return {META_PREFIX + k: v for k, v in meta.items()}


_JSON_KEYS = {"recipe", "token_layout", "register_token_indices", "source", "interface", "preprocess",
              "float64_register_branch", "tail_accurate_register_branch"}  # (float64_: earlier exports)
_INT_KEYS = {"num_prefix_tokens", "num_registers", "export_batch_size"}


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """vit-surgery's metadata properties of an ONNX file, decoded (prefix dropped). Weights not loaded."""
    model = _load_proto(Path(path), load_external_data=False)
    out: dict[str, Any] = {}
    for p in model.metadata_props:
        if not p.key.startswith(META_PREFIX):
            continue
        key = p.key[len(META_PREFIX):]
        try:
            out[key] = json.loads(p.value) if key in _JSON_KEYS else int(p.value) if key in _INT_KEYS else p.value
        except ValueError:
            raise ModelInputError(f"{path}: metadata property {p.key} is malformed") from None
    return out


def _load_proto(path: Path, load_external_data: bool) -> Any:
    import onnx

    if not path.is_file():
        raise ModelInputError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as e:  # DecodeError, OSError, ValidationError for a bad external-data reference, ...
        raise ModelInputError(f"{path}: not a readable ONNX model ({type(e).__name__}: {first_line(e)}); "
                              "re-export it with `vit-surgery export OUT --format onnx --overwrite`") from None


# ---- export ------------------------------------------------------------------------------------

def _export_proto(wrapper: nn.Module, example: torch.Tensor, spec: OnnxSpec, exporter: str, scratch: Path,
                  progress: bool) -> Any:
    """Run one torch exporter; return the ModelProto (weights in memory)."""
    import onnx

    sink = sys.stderr if progress else io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # TracerWarnings, the legacy exporter's DeprecationWarning
        stack.enter_context(contextlib.redirect_stdout(sink))  # the dynamo exporter prints its steps
        stack.enter_context(_mha_fastpath_disabled())
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


def _fix_io_shapes(proto: Any, spec: OnnxSpec, shapes: dict[str, Sequence[int]]) -> None:
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


def _save_proto(proto: Any, path: Path, external: bool) -> None:
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
    wrapper = _ExportWrapper(model, family, dtype).eval()
    example = torch.randn(spec.export_batch_size, c, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), _mha_fastpath_disabled():
        pooled, tokens = wrapper(example)
    shapes = {spec.input_names[0]: tuple(example.shape), spec.output_names[0]: tuple(pooled.shape),
              spec.output_names[1]: tuple(tokens.shape)}
    order = [exporter] + [e for e in EXPORTERS if e != exporter]
    errors: list[str] = []
    for name in order:
        _say(progress, f"exporting ONNX with the {name} exporter (opset {spec.opset}, "
                       f"{'float16' if fp16 else 'float32'}, batch {spec.export_batch_size})")
        try:
            with tail_accurate_register_branches(model) as tail_branches:
                proto = _export_proto(wrapper, example, spec, name, scratch, progress)
        except SurgeryError:
            raise
        except Exception as e:  # each exporter has its own gaps; the other one may cover them
            errors.append(f"{name}: {type(e).__name__}: {first_line(e)}")
            log.warning("the %s ONNX exporter failed (%s)%s", name, errors[-1],
                        "; trying the next one" if name != order[-1] else "")
            continue
        _fix_io_shapes(proto, spec, shapes)
        return GraphExport(proto, name, shapes, tail_branches)
    raise ModelInputError("could not export the model to ONNX: " + "; ".join(errors))


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
    kept = [p for p in proto.metadata_props if not p.key.startswith(META_PREFIX)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.doc_string = ("vit-surgery baked model with test-time registers inside the graph; "
                        "inputs/outputs and recipe in metadata_props (vit_surgery.*)")
    size = _weights_bytes(proto)
    external = size > external_data_threshold
    path = scratch / ONNX_FILE
    _save_proto(proto, path, external)
    return ExportInfo(path, used, "float16" if fp16 else "float32", external, size)


# ---- validation ------------------------------------------------------------------------------------

@dataclass
class Comparison:
    """One ONNX output judged against the hooked reference run in float64, over every validated image
    (surgery/judge.py: per feature vector, tolerance scaled by the vector's measured conditioning)."""

    output: str
    against: str  # "float64_reference": the hooked reference on the un-baked source, in float64
    error: OutputError
    tolerance: float

    @property
    def relative(self) -> float:
        return self.error.relative

    @property
    def passed(self) -> bool:
        return self.error.passed(self.tolerance)

    @property
    def label(self) -> str:
        return f"{self.output} vs {self.against.replace('_', ' ')}"

    def to_dict(self) -> dict[str, Any]:
        d = self.error.to_dict()
        d.update(output=self.output, against=self.against, tolerance=self.tolerance, passed=self.passed)
        return d


@dataclass
class OnnxReport:
    path: str
    dtype: str = "float32"
    tolerance: float = FP32_TOLERANCE
    export_batch_size: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    images: int = 0
    opset: int = 0
    external_data: bool = False
    comparisons: list[Comparison] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # failures that are not numeric (stale metadata)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.problems and bool(self.comparisons) and all(c.passed for c in self.comparisons)

    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.passed]

    @property
    def worst(self) -> Optional[Comparison]:
        return max(self.comparisons, key=lambda c: c.error.excess(c.tolerance)) if self.comparisons else None

    def summary(self) -> str:
        head = (f"onnx {'PASS' if self.passed else 'FAIL'} ({self.dtype}, onnxruntime CPU, optimisation ALL, "
                f"batch sizes {sorted(set(self.batch_sizes))}, exported at batch {self.export_batch_size})")
        if self.problems:
            return f"{head}: {'; '.join(self.problems)}"
        fails = self.failures()
        if fails:
            parts = [f"{c.label} relative error {c.error.relative_at_where:.3g} > allowed "
                     f"{c.error.allowed if c.error.allowed is not None else c.tolerance:.3g} (tolerance {c.tolerance:g})"
                     + (f" at (image, token) {tuple(c.error.where)}" if c.error.where else "")
                     for c in fails]
            return f"{head}: out of tolerance: {'; '.join(parts)}, over {self.images} image(s)"
        w = self.worst
        if w is None:
            return f"{head}: nothing compared"
        allowed = w.error.allowed
        note = f", allowed there {allowed:.3g}" if allowed is not None and allowed > w.tolerance else ""
        return (f"{head}: worst relative error {w.error.relative_at_where:.3g} (tolerance {w.tolerance:g}{note}) in "
                f"{w.label}, over {self.images} image(s)")

    def to_dict(self) -> dict[str, Any]:
        w = self.worst
        return {"passed": self.passed, "path": self.path, "dtype": self.dtype, "tolerance": self.tolerance,
                "runtime": "onnxruntime CPUExecutionProvider, graph_optimization_level ORT_ENABLE_ALL",
                "relative_error_definition": "per feature vector ||onnx - reference|| / ||reference|| (parity's)",
                "judge": JUDGE,
                "export_batch_size": self.export_batch_size, "batch_sizes": self.batch_sizes,
                "images": self.images, "opset": self.opset, "external_data": self.external_data,
                "worst": w.to_dict() if w else None, "comparisons": [c.to_dict() for c in self.comparisons],
                "problems": self.problems, "summary": self.summary()}


def _ort_session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelInputError(f"{path}: onnxruntime cannot load it ({first_line(e)})") from None


def _check_model(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ModelInputError(f"{path}: not a valid ONNX model (onnx.checker: {first_line(e)}); "
                              "re-export it with `vit-surgery export OUT --format onnx --overwrite`") from None


def _rebatch(batches: Sequence[torch.Tensor], export_batch: int) -> list[torch.Tensor]:
    """The given batches, split so that at least one has a size other than the export batch size."""
    out = [b for b in batches if len(b)]
    if out and all(len(b) == export_batch for b in out):
        first = out[0]
        out = [first[:1], first[1:]] + out[1:] if len(first) > 1 else out
    return out


def _torch_outputs(model: nn.Module, family: Any, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    pooled, tokens = family.forward_both(model, pixels)
    return {"pooled": pooled, "tokens": tokens}


class _RefusingSession:
    """An onnxruntime session whose failures on a batch become one-line ModelInputErrors naming the file."""

    def __init__(self, session: Any, path: Path) -> None:
        self.session, self.path = session, path

    def run(self, output_names: Sequence[str], feeds: dict[str, Any]) -> list[Any]:
        try:
            return self.session.run(output_names, feeds)
        except Exception as e:
            shape = tuple(next(iter(feeds.values())).shape)
            raise ModelInputError(f"{self.path}: onnxruntime failed on a batch of {shape} "
                                  f"({first_line(e)})") from None


@torch.no_grad()
def judge_runtime_outputs(report: OnnxReport, session: Any, loaded: Any, batches: list[torch.Tensor], *,
                          pooled: Optional[Callable[[Any, torch.Tensor], torch.Tensor]] = None,
                          where: str = "") -> OnnxReport:
    """Run `session` (ORT's `run(output_names, {input_name: array})` interface, VIT_ONNX_SPEC names) on
    `batches` re-split so one size differs from the export batch, and judge each named output against
    the hooked reference on the un-baked source in float64, per feature vector (surgery/judge.py).
    Fills `report.comparisons`, `batch_sizes`, `images`; a shape mismatch goes to `report.problems`
    (prefixed with `where`). `pooled(model, pixels)` overrides which PyTorch output `pooled` means.
    Shared by `validate_onnx` and `runtime_check.validate_runtime`."""
    import numpy as np

    from surgery.core.judge import float64_reference

    spec, fam, tol = VIT_ONNX_SPEC, loaded.adapter, report.tolerance
    source64 = _unbaked_float64(loaded)

    def capture(model: nn.Module, family: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = _torch_outputs(model, family, x)
        if pooled is not None:
            out["pooled"] = pooled(model, x)
        return out

    comps = {o: Comparison(o, "float64_reference", OutputError(o), tol) for o in spec.output_names}
    offset = 0
    with _exact_torch():
        for pixels in _rebatch(batches, report.export_batch_size):
            x = pixels.to("cpu", torch.float32).contiguous()
            got = dict(zip(spec.output_names, session.run(spec.output_names, {spec.input_names[0]: x.numpy()})))
            judge = float64_reference(source64, loaded.recipe, fam, x, capture)
            for o in spec.output_names:
                g = torch.from_numpy(np.asarray(got[o]).astype(np.float32))  # fp16 graphs: exact widening
                want = judge.exact[o].cpu()
                if g.shape != want.shape:
                    report.problems.append(f"{where}output {o} has shape {tuple(g.shape)}, the model's "
                                           f"{tuple(want.shape)} (exported from another model?)")
                    return report
                comps[o].error.update(g, want, offset=offset, allowed=judge.allowed(o, tol, g).cpu())
            offset += len(x)
            report.batch_sizes.append(len(x))
    report.images = offset
    report.comparisons = list(comps.values())
    return report


def _unbaked_float64(loaded: Any) -> nn.Module:
    """The judge's model: the loaded baked model with its registers taken out, in float64."""
    from surgery.core.bake import unbaked_copy

    return unbaked_copy(loaded.model, adapter=loaded.adapter).to(torch.float64).eval()  # judge.as_float64, one copy


def _onnx_report_header(path: Path, out_dir: Path, loaded: Any, tolerance: Optional[float]) -> OnnxReport:
    """The report for `path` before any numbers: checker, interface and metadata checks. A file that is
    not a vit-surgery export raises ModelInputError; a stale one gets `problems`."""
    if loaded.recipe is None:
        raise ModelInputError(f"{loaded.spec} carries no baked test-time registers (not a vit-surgery output)")
    _check_model(path)
    meta = read_onnx_metadata(path)
    proto = _load_proto(path, load_external_data=False)
    names_in = [i.name for i in proto.graph.input]
    names_out = [o.name for o in proto.graph.output]
    spec = VIT_ONNX_SPEC
    if names_in != spec.input_names or names_out != spec.output_names or "recipe" not in meta:
        raise ModelInputError(f"{path}: not a vit-surgery ONNX export (inputs {names_in}, outputs {names_out}, "
                              f"{'no ' if 'recipe' not in meta else ''}vit_surgery metadata)")
    dtype = str(meta.get("dtype", "float32"))
    tol = tolerance if tolerance is not None else (FP16_TOLERANCE if dtype == "float16" else FP32_TOLERANCE)
    report = OnnxReport(path=str(path), dtype=dtype, tolerance=tol,
                        export_batch_size=int(meta.get("export_batch_size", spec.export_batch_size)),
                        opset=max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0),
                        external_data=any(t.data_location == 1 for t in proto.graph.initializer),
                        metadata=meta)
    if meta.get("recipe") != loaded.recipe.to_dict():
        report.problems.append(f"{path.name} was exported with another recipe than the model in {out_dir} "
                               "(stale export); re-export it with --overwrite")
    layout = token_layout(loaded)
    if meta.get("register_token_indices") != layout["register_indices"]:
        report.problems.append(f"{path.name} records register tokens at {meta.get('register_token_indices')}, "
                               f"the model has them at {layout['register_indices']}")
    return report


@torch.no_grad()
def validate_onnx(out_dir: Path, loaded: Any, batches: list[torch.Tensor], *, onnx_path: Optional[Path] = None,
                  tolerance: Optional[float] = None, progress: bool = False) -> OnnxReport:
    """Check `out_dir/model.onnx` (or `onnx_path`): onnx.checker, then onnxruntime (CPU, optimisation
    ALL) against the PyTorch baked model and the hooked reference on `batches` (re-split so one batch
    size differs from the export batch). A missing, corrupt or foreign file raises ModelInputError;
    numeric disagreement is reported (`passed`, `summary`), not raised."""
    path = Path(onnx_path) if onnx_path is not None else Path(out_dir) / ONNX_FILE
    report = _onnx_report_header(path, Path(out_dir), loaded, tolerance)
    if report.problems:
        return report
    session = _RefusingSession(_ort_session(path), path)
    return judge_runtime_outputs(report, session, loaded, batches, where=f"{path.name} ")


# ---- export + validate + move into place ---------------------------------------------------------

def validation_batches(loaded: Any, sizes: Sequence[int] = (1, 5)) -> list[torch.Tensor]:
    """Built-in calibration images through the model's own transform, in batches of `sizes`."""
    from surgery.core.images import ImageBatches, list_images
    from surgery.core.images import builtin_images

    files = list_images(builtin_images())[:sum(sizes)]
    pixels = torch.cat([x for x, _ in ImageBatches(files, loaded.transform, 8, progress=False)])
    out, start = [], 0
    for s in sizes:
        if start < len(pixels):
            out.append(pixels[start:start + s])
        start += s
    return out


@contextlib.contextmanager
def staged_output(out_dir: Path, prefix: str) -> Iterator[Path]:
    """A scratch folder inside `out_dir` (same filesystem: moving a file out of it is an atomic rename),
    removed afterwards whatever happens, so a failed export leaves nothing behind."""
    scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def publish_validated(report: OnnxReport, failure: str, moves: Sequence[tuple[Path, Path]]) -> None:
    """Raise ParityError(`failure`) unless `report` passed; then move each staged file onto its target,
    in order (os.replace: an existing target is replaced only now)."""
    if not report.passed:
        raise ParityError(failure)
    for staged, target in moves:
        os.replace(staged, target)


def record_parity_section(out_dir: Path, key: str, entry: Any, *, create: bool) -> None:
    """Set `key` in OUT/parity.json to `entry`, written atomically. A missing, unreadable or non-object
    parity.json is started afresh with `create`, left alone without."""
    f = out_dir / "parity.json"
    doc: Any = None
    if f.is_file():
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            doc = None
    if not isinstance(doc, dict):
        if not create:
            return
        doc = {}
    doc[key] = entry
    tmp = f.with_name(f".{f.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, f)


def _update_parity_json(out_dir: Path, report: OnnxReport) -> None:
    record_parity_section(out_dir, "onnx", report.to_dict(), create=False)


def _staged_moves(scratch: Path, out_dir: Path, external: bool) -> list[tuple[Path, Path]]:
    """model.onnx and, for large models, its external weights, weights first (the graph names them)."""
    moves = [(scratch / DATA_FILE, out_dir / DATA_FILE)] if external else []
    return moves + [(scratch / ONNX_FILE, out_dir / ONNX_FILE)]


def export_and_validate(out_dir: Path, fp16: bool = False, progress: bool = True, *, loaded: Any,
                        exporter: str = "dynamo", batches: Optional[list[torch.Tensor]] = None,
                        external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
                        tolerance: Optional[float] = None, say_summary: bool = True) -> OnnxReport:
    """Load the baked model in `out_dir`, export it, validate it, and only then move `model.onnx` (and
    `model.onnx.data` for large models) into `out_dir`. Failing validation raises ParityError naming the
    outputs out of tolerance and writes nothing; an existing model.onnx is replaced only on success.
    With `progress`, steps (and the summary, unless `say_summary` is False) go to stderr."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ModelInputError(f"model folder not found: {out_dir}")
    if loaded.recipe is None:
        raise ModelInputError(f"{out_dir} carries no baked test-time registers (run `vit-surgery convert` first)")
    with staged_output(out_dir, ".onnx-export-") as scratch:
        info = export_onnx(loaded, out_dir, scratch, fp16=fp16, exporter=exporter,
                           external_data_threshold=external_data_threshold, progress=progress)
        _say(progress, f"validating {ONNX_FILE} in onnxruntime against PyTorch and the hooked reference")
        work = batches if batches is not None else validation_batches(loaded)
        report = validate_onnx(out_dir, loaded, work, onnx_path=info.path, tolerance=tolerance, progress=progress)
        report.path = str(out_dir / ONNX_FILE)
        publish_validated(report, f"ONNX export failed validation, no {ONNX_FILE} written: {report.summary()}",
                          _staged_moves(scratch, out_dir, info.external_data))
        if not info.external_data and (out_dir / DATA_FILE).exists():  # a previous, larger export's weights
            (out_dir / DATA_FILE).unlink()
        _update_parity_json(out_dir, report)
        _say(progress and say_summary, report.summary())
        return report
