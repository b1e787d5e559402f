"""Validation of an ONNX export (optimum's validate_model_outputs): onnx.checker, then onnxruntime on the
CPU provider with graph optimisation level ALL.

Every output is judged against the hooked reference on the un-baked source run in float64, at batch
sizes that include one different from the export batch, by the same rule as `check`
(surgery/core/judge.py): per feature vector, relative error ||onnx - reference|| / ||reference||, allowed
`tolerance x max(1, conditioning / median conditioning)` where a vector's conditioning is measured on
the float64 run under seeded float32-sized noise. So neither onnxruntime's nor PyTorch's float32
kernels decide the verdict, and noise on one ill-conditioned vector (the register token of an image
without outliers) cannot excuse an error on another. Tolerances: FP32_TOLERANCE (1e-5) for float32
exports, FP16_TOLERANCE (2e-2) for float16 exports (float16 keeps 11 significant bits, unit roundoff
4.9e-4; a dozen residual blocks accumulate a few times 1e-3 against the float32 model).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from surgery.core.errors import ModelInputError, first_line
from surgery.core.parity import JUDGE, OutputError, round_up_tolerance
from surgery.core.images import split_batches, with_another_batch_size
from surgery.core.onnx_runtime import RUNTIME, RUNTIME_DETAIL, open_session
from surgery.core.verdict import verdict_word

from .onnx_metadata import load_proto, read_onnx_metadata, token_layout
from .onnx_patches import exact_torch
from surgery.core.output_format import FP16_TOLERANCE, FP32_TOLERANCE, ONNX_FILE

from .onnx_spec import VIT_ONNX_SPEC


@dataclass
class Comparison:
    """One ONNX output judged against the hooked reference run in float64, over every validated image
    (surgery/core/judge.py: per feature vector, tolerance scaled by the vector's measured conditioning)."""

    output: str
    against: str  # "float64_reference": the hooked reference on the un-baked source, in float64
    error: OutputError
    tolerance: float

    @property
    def relative(self) -> float:
        return self.error.relative

    @property
    def passed(self) -> bool:
        return self.error.within(self.tolerance)

    @property
    def label(self) -> str:
        return f"{self.output} vs {self.against.replace('_', ' ')}"

    def summary(self) -> str:
        allowed = self.error.allowed if self.error.allowed is not None else self.tolerance
        return (f"{self.label} {verdict_word(self.passed)}: relative error {self.error.relative_at_where:.3g}, "
                f"allowed {allowed:.3g} (tolerance {self.tolerance:g})")

    def to_dict(self) -> dict[str, Any]:
        d = self.error.to_dict()
        d.update(output=self.output, against=self.against, tolerance=self.tolerance, passed=self.passed,
                 summary=self.summary())
        return d


@dataclass
class OnnxReport:
    """One exported file validated in its runtime (any format: `format` and `runtime` say which)."""

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
    format: str = "onnx"  # the label of the format (exporters/formats.py), first word of the summary
    runtime: str = RUNTIME  # what ran the graph, as the summary says it
    runtime_detail: str = RUNTIME_DETAIL

    @property
    def passed(self) -> bool:
        return not self.problems and bool(self.comparisons) and all(c.passed for c in self.comparisons)

    def failures(self) -> list[Comparison]:
        return [c for c in self.comparisons if not c.passed]

    @property
    def worst(self) -> Optional[Comparison]:
        return max(self.comparisons, key=lambda c: c.error.excess(c.tolerance)) if self.comparisons else None

    def summary(self) -> str:
        head = (f"{self.format} {verdict_word(self.passed)} ({self.dtype}, {self.runtime}, "
                f"batch sizes {sorted(set(self.batch_sizes))}, exported at batch {self.export_batch_size})")
        if self.problems:
            return f"{head}: {'; '.join(self.problems)}"
        fails = self.failures()
        if fails:
            parts = [f"{c.label} relative error {c.error.relative_at_where:.3g} > allowed "
                     f"{c.error.allowed if c.error.allowed is not None else c.tolerance:.3g} (tolerance {c.tolerance:g})"
                     + (f" at (image, token) {tuple(c.error.where)}" if c.error.where else "")
                     + (f", where the hooked reference itself in float32 is off by {c.error.own_at_where:.3g} "
                        f"({c.error.own_max:.3g} at most)" if c.error.own_at_where is not None
                        and c.error.own_max is not None else "")
                     for c in fails]
            # as parity's FAIL line, the tolerance under which every failing vector would pass; but the
            # export commands take no --tolerance (each format validates at its own), so say that too
            largest = max(c.error.relative for c in fails)
            return (f"{head}: out of tolerance: {'; '.join(parts)}, over {self.images} image(s); a wrong export "
                    f"is usually off by far more: accepting this one needs a tolerance of "
                    f"{round_up_tolerance(largest)}, and --tolerance does not loosen an export's validation "
                    f"(each format validates at its own, here {self.tolerance:g})")
        w = self.worst
        if w is None:
            return f"{head}: nothing compared"
        why = w.error.why_allowed(w.tolerance)
        note = f", allowed there {w.error.allowed:.3g}: {why}" if why else ""
        return (f"{head}: worst relative error {w.error.relative_at_where:.3g} (tolerance {w.tolerance:g}{note}) in "
                f"{w.label}, over {self.images} image(s)")

    def to_dict(self) -> dict[str, Any]:
        w = self.worst
        return {"passed": self.passed, "path": self.path, "format": self.format, "dtype": self.dtype,
                "tolerance": self.tolerance, "runtime": self.runtime_detail,
                "relative_error_definition": "per feature vector ||onnx - reference|| / ||reference|| (parity's)",
                "judge": JUDGE,
                "export_batch_size": self.export_batch_size, "batch_sizes": self.batch_sizes,
                "images": self.images, "opset": self.opset, "external_data": self.external_data,
                "worst": w.to_dict() if w else None, "comparisons": [c.to_dict() for c in self.comparisons],
                "problems": self.problems, "summary": self.summary()}


def _check_model(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ModelInputError(f"{path}: not a valid ONNX model (onnx.checker: {first_line(e)}); "
                              "re-export it with `vit-surgery export OUT --format onnx --overwrite`") from None


def _torch_outputs(model: nn.Module, family: Any, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    pooled, tokens = family.forward_both(model, pixels)
    return {"pooled": pooled, "tokens": tokens}


@torch.no_grad()
def judge_runtime_outputs(report: OnnxReport, session: Any, loaded: Any, batches: list[torch.Tensor], *,
                          pooled: Optional[Callable[[Any, torch.Tensor], torch.Tensor]] = None,
                          where: str = "") -> OnnxReport:
    """Run `session` (ORT's `run(output_names, {input_name: array})` interface, VIT_ONNX_SPEC names) on
    `batches` re-split so one size differs from the export batch, and judge each named output against
    the hooked reference on the un-baked source in float64, per feature vector (surgery/core/judge.py).
    Fills `report.comparisons`, `batch_sizes`, `images`; a shape mismatch goes to `report.problems`
    (prefixed with `where`). `pooled(model, pixels)` overrides which PyTorch output `pooled` means.
    Shared by `validate_onnx`, the OpenVINO IR's validation and the INT8 export."""
    import numpy as np

    from surgery.core.judge import float64_reference, kernel_allowance

    spec, fam, tol = VIT_ONNX_SPEC, loaded.adapter, report.tolerance
    source64 = _unbaked_float64(loaded)

    def capture(model: nn.Module, family: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = _torch_outputs(model, family, x)
        if pooled is not None:
            out["pooled"] = pooled(model, x)
        return out

    comps = {o: Comparison(o, "float64_reference", OutputError(o), tol) for o in spec.output_names}
    offset = 0
    with exact_torch():
        for pixels in with_another_batch_size(batches, report.export_batch_size):
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
                allowed = judge.allowed(o, tol, g).cpu()
                own = judge.measured_own_error(o)
                comps[o].error.update(g, want, offset=offset, allowed=allowed, tolerance=tol,
                                      own=None if own is None else own.cpu(),
                                      kernel=None if own is None else kernel_allowance(own).cpu())
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
    proto = load_proto(path, load_external_data=False)
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
    session = open_session(path)
    return judge_runtime_outputs(report, session, loaded, batches, where=f"{path.name} ")


def validation_batches(loaded: Any, sizes: Sequence[int] = (1, 5)) -> list[torch.Tensor]:
    """Built-in calibration images through the model's own transform, in batches of `sizes`."""
    from surgery.core.images import ImageBatches, builtin_images, list_images

    files = list_images(builtin_images())[:sum(sizes)]
    return split_batches(torch.cat([x for x, _ in ImageBatches(files, loaded.transform, 8, progress=False)]), sizes)


