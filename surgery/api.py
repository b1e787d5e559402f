"""The verbs of vit-surgery, for the Python API and the CLI alike: `find`, `convert`, `check`, `export`,
plus `bake` (in memory, no files) and `load`.

One source dispatch: each verb takes what `vit-surgery VERB` takes (a model spec string, a model folder,
an .onnx file or a folder of ONNX files) and an in-memory timm / transformers model where that makes
sense; ONNX inputs go to surgery/pipeline_onnx.py (graph rewriting), everything else to
surgery/pipeline.py. The CLI (surgery/cli/) only parses arguments, calls these and prints what they
return. Errors are `SurgeryError`s with the CLI's messages (their `exit_code` is the CLI's).

Progress: silent by default (records go to the "surgery" logger); `progress=True` shows the CLI's bars /
lines on stderr, a callable gets `(stage, done, total)` (surgery/core/progress.py).

Imports stay light at module level: `check` and `export` verify a folder's files before torch loads.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence
import warnings

from .core import progress as _progress
from .core.errors import ModelInputError, UsageError
from .core.output_format import FP32_TOLERANCE
from .core.verdict import FAIL, Verdict

if TYPE_CHECKING:
    from torch import nn

    from .core.discovery import DiscoveryConfig, DiscoveryResult
    from .core.recipe import Recipe
    from .core.source import LoadedModel, LoadOptions
    from .pipeline import ConvertResult

Progress = Any  # bool | callable(stage, done, total) | surgery.core.progress.Progress


def is_onnx(spec: Any) -> bool:
    """Whether `spec` names an ONNX file or a folder of ONNX files (handled by graph rewriting)."""
    if not isinstance(spec, (str, Path)):
        return False
    from .pipeline_onnx import is_onnx as _is_onnx

    return _is_onnx(spec)


def _options(options: Optional[LoadOptions]) -> LoadOptions:
    from .core.source import LoadOptions

    return options or LoadOptions()


def load_source(spec: str | Path, options: Optional[LoadOptions] = None) -> LoadedModel:
    """A model spec or folder through the backends' loaders (the "loading" stage)."""
    from .backends import load_model

    with _progress.stage(f"loading {spec}"):
        return load_model(str(spec), _options(options))


@contextlib.contextmanager
def _as_loaded(model_or_spec: Any, options: LoadOptions) -> Iterator[LoadedModel]:
    from torch import nn

    from .backends import load_model
    from .core.source import LoadedModel

    if isinstance(model_or_spec, LoadedModel):
        yield model_or_spec
    elif isinstance(model_or_spec, (str, Path)):
        yield load_source(model_or_spec, options)
    elif isinstance(model_or_spec, nn.Module):
        with tempfile.TemporaryDirectory(prefix="vit-surgery-src-") as tmp:
            spec = _save_in_own_format(model_or_spec, Path(tmp) / "model")
            loaded = load_model(str(spec), options)
            loaded.spec = _describe(model_or_spec)
            hub = (getattr(model_or_spec, "pretrained_cfg", None) or {}).get("hf_hub_id")
            if hub:  # where the weights came from: the model card's base_model
                loaded.source.base_model = hub
            yield loaded
    else:
        raise ModelInputError(f"expected a model spec, a folder, an .onnx file or a timm / transformers model, "
                              f"not {type(model_or_spec).__name__}")


def _save_in_own_format(model: nn.Module, folder: Path) -> Path:
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):  # transformers PreTrainedModel
        model.save_pretrained(folder, safe_serialization=True)
        return folder
    if hasattr(model, "pretrained_cfg"):  # built by timm.create_model
        from timm.models import save_for_hf

        save_for_hf(model, str(folder), safe_serialization=True)
        return folder
    raise ModelInputError(f"an in-memory {type(model).__name__} cannot be converted: pass the model spec "
                          "(e.g. 'open_clip:ViT-B-16/laion2b_s34b_b88k') or a model folder instead")


def _describe(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("hf_hub_id") or cfg.get("architecture")
    if name is None and hasattr(model, "config"):
        name = getattr(model.config, "_name_or_path", "") or model.config.model_type
    return f"<in-memory {type(model).__name__}{' ' + name if name else ''}>"


# ---- find ------------------------------------------------------------------------------------------

def find(
    model_or_spec: Any,
    images: str | Path,
    *,
    out: Optional[str | Path] = None,
    overwrite: bool = False,
    discovery: Optional[DiscoveryConfig] = None,
    options: Optional[LoadOptions] = None,
    progress: Progress = False,
) -> DiscoveryResult:
    """`vit-surgery find`: rank MLP units on calibration `images` and pick the register neurons. With
    `out`, the result is also written there as neurons.json (what `convert(neurons=...)` reads)."""
    with _progress.reporting(_progress.for_api(progress)):
        if is_onnx(model_or_spec):
            from .pipeline_onnx import find_onnx

            result = find_onnx(model_or_spec, images, discovery, progress=True)
        else:
            from .pipeline import run_find

            with _as_loaded(model_or_spec, _options(options)) as loaded:
                result = run_find(loaded, images, discovery or _default_discovery(), progress=True)
        if out is not None:
            from .core.outputs import atomic_output_file
            from .core.output_format import write_json

            with atomic_output_file(Path(out), overwrite) as tmp:
                write_json(tmp, result.to_json())
        return result


def _default_discovery() -> DiscoveryConfig:
    from .core.discovery import DiscoveryConfig

    return DiscoveryConfig()


# ---- convert ---------------------------------------------------------------------------------------

def convert(
    model_or_spec: Any,
    out: str | Path,
    *,
    images: Optional[str | Path] = None,
    neurons: Optional[str | Path] = None,
    to: str = "native",
    onnx: bool = False,
    formats: Sequence[str] = (),
    fp16: bool = False,
    dtype: Optional[str] = None,
    check: bool = True,
    check_images: Optional[str | Path] = None,
    tolerance: float = FP32_TOLERANCE,
    overwrite: bool = False,
    discovery: Optional[DiscoveryConfig] = None,
    num_registers: Optional[int] = None,
    scale: Optional[float] = None,
    mode: Optional[str] = None,
    options: Optional[LoadOptions] = None,
    progress: Progress = False,
) -> ConvertResult:
    """`vit-surgery convert`: bake test-time registers and write a checked, standalone folder at `out`.

    `model_or_spec`: a spec or folder, an .onnx file or ONNX folder (rewritten graph by graph), or an
    in-memory timm / transformers model. `neurons`: a neurons.json path or a published set name;
    `images`: find the neurons first; neither: the published set when the model is recognised.
    `to="timm"` re-expresses open_clip / HF CLIP and HF DINOv2 models as timm. `formats=("onnx",
    "openvino", ...)` also writes and validates those export formats (the registry in
    exporters/formats.py) before `out` is moved into place; `onnx=True` is `formats=("onnx",)`.
    """
    if neurons is not None and images is not None:
        raise UsageError("convert takes neurons= or images=, not both")
    if to not in ("native", "timm"):
        raise UsageError(f"to= must be 'native' or 'timm', not {to!r}")
    overrides = {"num_registers": num_registers, "scale": scale, "mode": mode}
    with _progress.reporting(_progress.for_api(progress)):
        if is_onnx(model_or_spec):
            if to != "native" or onnx or formats or fp16 or dtype:
                raise UsageError("--to, --onnx, --formats, --fp16 and --dtype apply to PyTorch models; an ONNX input "
                                 "is written as ONNX (each file rewritten)")
            from .pipeline_onnx import convert_onnx_source

            return convert_onnx_source(str(model_or_spec), out, neurons=None if neurons is None else str(neurons),
                                       images=images, discovery=discovery, overrides=overrides, check=check,
                                       check_images=check_images, tolerance=tolerance, overwrite=overwrite)
        from .pipeline import export_formats_hook, run_convert

        opts = _options(options)
        exports: list[Verdict] = []
        after = export_formats_hook((["onnx"] if onnx else []) + list(formats), fp16=fp16, options=opts,
                                    reports=exports)
        with _as_loaded(model_or_spec, opts) as loaded:
            if to == "timm":
                from .to_timm import to_timm

                loaded = to_timm(loaded)
            res = run_convert(loaded, out, neurons=None if neurons is None else str(neurons), images=images,
                              discovery=discovery, overrides=overrides, check=check, check_images=check_images,
                              tolerance=tolerance, overwrite=overwrite, options=opts, progress=True,
                              after_write=after, dtype=dtype)
        res.exports = exports
        from .pipeline import warn_remaining_outliers

        warn_remaining_outliers(res.effect)
        return res


# ---- check -----------------------------------------------------------------------------------------

@dataclass
class CheckResult:
    """What `check` found (a Verdict, surgery/core/verdict.py). `report`: the parity report of the folder
    (or the ONNX check report); `exports`: the validation reports of the export formats present;
    `document`: the JSON --report holds; `compared_against`: what the reference was built on; `notes`:
    lines said before the verdict."""

    report: Verdict
    exports: list[Verdict] = field(default_factory=list)
    effect: Optional[dict[str, Any]] = None
    compared_against: str = ""
    document: dict[str, Any] = field(default_factory=dict)
    failed_exports: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.report.passed and not self.failed_exports

    def summary_lines(self) -> list[str]:
        """The lines `vit-surgery check` prints (stdout), in order."""
        from .pipeline import effect_lines

        head = [f"compared against {self.compared_against}"] if self.compared_against else []
        return self.notes + head + [r.summary() for r in self.exports] + [self.report.summary()] + effect_lines(self.effect)

    def failure(self) -> str:
        """The one-line reason `check` fails ('' when it passes)."""
        if not self.report.passed:
            return self.report.summary()
        if self.failed_exports:
            return f"exports {FAIL}: exported file(s) out of tolerance: {', '.join(self.failed_exports)}"
        return ""

    def summary(self) -> str:
        """One line: why it fails, else the report's own line."""
        return self.failure() or self.report.summary()

    def to_dict(self) -> dict[str, Any]:
        """The --report document, with the verdict."""
        return dict(self.document, passed=self.passed, summary=self.summary())


def check(
    out: str | Path,
    *,
    source: Optional[str | Path] = None,
    images: Optional[str | Path] = None,
    num_images: int = 16,
    batch_size: int = 8,
    seed: int = 0,
    tolerance: Optional[float] = None,
    skip_exports: bool = False,
    options: Optional[LoadOptions] = None,
    progress: Progress = False,
) -> CheckResult:
    """`vit-surgery check`: verify OUT's files against its integrity record, then judge it against the
    hooked reference in float64 (and re-validate every export format present). Never writes into OUT.

    `tolerance`: None uses the one OUT was converted with (recorded in its parity.json), else 1e-5.
    ONNX outputs need `source` (the hooked reference graph is built on it). Returns the result; it does
    not raise on a failed comparison (`result.passed`), only on unusable inputs."""
    with _progress.reporting(_progress.for_api(progress)):
        if is_onnx(out):
            from .pipeline_onnx import check_onnx_source

            report, doc = check_onnx_source(out, source, images=images, num_images=num_images, seed=seed,
                                            tolerance=tolerance)
            return CheckResult(report, document=doc)
        return _check_folder(out, source, images, num_images, batch_size, seed, tolerance, skip_exports,
                             _options(options))


def _check_folder(out: str | Path, source: Optional[str | Path], images: Optional[str | Path], num_images: int,
                  batch_size: int, seed: int, tolerance: Optional[float], skip_exports: bool,
                  options: LoadOptions) -> CheckResult:
    from .core.errors import IntegrityError
    from .core.integrity import read_surgery, source_for_check, verify_before_check
    from .core.output_format import recorded_tolerance
    from .core.outputs import local_source_path

    folder = local_source_path(str(out)) or Path(out)
    verified = verify_before_check(folder, say_missing=False)
    from .pipeline import parity_batches, run_check

    loaded = load_source(out, options)
    if loaded.recipe is None:
        raise ModelInputError(f"{out} carries no baked test-time registers (not a vit-surgery output)")
    if read_surgery(folder) is None:
        warnings.warn(f"{out} has no surgery.json (deleted, or not written by convert): its files cannot be "
                      "verified; only a comparison with --source can tell a damaged output from a good one",
                      stacklevel=3)
    src, used = source_for_check(folder, None if source is None else str(source),
                                 lambda spec: load_source(spec, options))
    if not verified and src is None:
        raise IntegrityError(f"{out} cannot be verified (no integrity record) and its source is not here: "
                             "pass --source MODEL, the model it was converted from")
    notes = []
    if tolerance is None:
        recorded = recorded_tolerance(folder)
        tolerance = recorded if recorded is not None else FP32_TOLERANCE
        if recorded is not None and recorded != FP32_TOLERANCE:
            notes.append(f"tolerance {recorded:g}, as recorded in {Path(out).name}/parity.json by convert "
                         "(--tolerance overrides it)")
    batches = parity_batches(loaded, images, num_images, batch_size, seed, True)
    report, effect = run_check(loaded, batches, source=src, tolerance=tolerance)
    doc: dict[str, Any] = {"parity": report.to_dict(), "effect": effect}
    exports, failed = ([], []) if skip_exports else _check_exports(Path(out), loaded, batches, doc)
    return CheckResult(report, exports=exports, effect=effect, compared_against=used, document=doc,
                       failed_exports=failed, notes=notes)


def _check_exports(out: Path, loaded: Any, batches: list[Any], doc: dict[str, Any]) -> tuple[list[Any], list[str]]:
    """Re-validate every export format present in OUT (the format registry); their reports go into
    `doc` under each format's parity.json key. Returns the reports and the files out of tolerance."""
    from surgery.exporters.formats import formats_present

    reports, failed = [], []
    for fmt in formats_present(out):
        with _progress.stage(f"validating {fmt.name}"):
            got = fmt.validate(out, loaded, batches)
        doc[fmt.parity_key] = {Path(r.path).name: r.to_dict() for r in got} if fmt.by_file else got[0].to_dict()
        for r in got:
            reports.append(r)
            if not r.passed:
                failed.append(Path(r.path).relative_to(out).as_posix() if Path(r.path).is_relative_to(out) else r.path)
    return reports, failed


# ---- export ----------------------------------------------------------------------------------------

@dataclass
class ExportResult:
    """What `export` wrote (`written`) and its validation report (a Verdict)."""

    report: Verdict
    written: list[str]

    @property
    def passed(self) -> bool:
        return bool(self.report.passed)

    def summary(self) -> str:
        return self.report.summary()

    def to_dict(self) -> dict[str, Any]:
        return dict(self.report.to_dict(), written=self.written)


def export(
    out: str | Path,
    *,
    format: str = "onnx",
    layout: str = "plain",
    fp16: bool = False,
    int8: Optional[str] = None,
    images: Optional[str | Path] = None,
    exporter: str = "dynamo",
    overwrite: bool = False,
    options: Optional[LoadOptions] = None,
    progress: Progress = False,
) -> ExportResult:
    """`vit-surgery export`: runtime files for a folder written by `convert` (ONNX, the HF ONNX layout,
    OpenVINO IR; `int8="static"|"dynamic"` an INT8 ONNX file), validated before they are written."""
    from .core.errors import MissingExtraError

    folder = Path(out)
    check_export_request(folder, format, layout, fp16, int8)
    with _progress.reporting(_progress.for_api(progress)):
        show = _progress.current().prints
        if int8 is not None:
            if fp16:
                raise UsageError("--int8 and --fp16 are exclusive")
            if format == "openvino":
                raise MissingExtraError("--format openvino --int8 needs NNCF post-training quantization, which this "
                                        "version does not ship (no \"openvino-int8\" extra yet); OpenVINO runs the QDQ "
                                        "file of `export OUT --format onnx --int8` as INT8 (openvino.convert_model)")
            if int8 == "static" and images is None:
                raise UsageError("--int8 static needs calibration images: --images CALIB (or use --int8 dynamic)")
            from surgery.exporters.onnx_int8 import export_int8

            loaded = load_source(folder, options)
            with _progress.stage(f"INT8 ({int8}) export"):
                report, written = export_int8(folder, loaded=loaded, mode=int8, images=images, layout=layout,
                                              exporter=exporter, progress=show, overwrite=overwrite)
            return ExportResult(report, [str(written)])
        if images is not None:
            raise UsageError("--images is for --int8 static (calibration images)")
        from surgery.exporters.base import ExportOptions
        from surgery.exporters.formats import format_for_cli

        fmt = format_for_cli(format, layout)
        if fp16 and not fmt.supports_fp16:
            raise UsageError(f"--format {format} takes no --fp16 (full precision only)")
        fmt.implementation()  # a missing optional package stops here, before the model loads
        loaded = load_source(folder, options)
        with _progress.stage(f"{fmt.name} export"):
            report = fmt.export(folder, loaded, ExportOptions(fp16=fp16, exporter=exporter, overwrite=overwrite,
                                                              progress=show))
        written = [str(folder / f) for f in fmt.files if (folder / f).exists()] or [report.path]  # a VLM
        return ExportResult(report, written)


def check_export_request(folder: Path, format: str, layout: str, fp16: bool, int8: Optional[str] = None) -> None:
    """export's checks that need no torch (the CLI runs them before it builds anything): the options fit
    together, `folder` is a converted folder matching its integrity record, a VLM is exported as HF layout
    (float), OUT/onnx is a folder or absent for the HF layout."""
    import json

    if format == "openvino" and (fp16 or layout != "plain"):
        raise UsageError("--format openvino takes neither --fp16 nor --layout hf")
    _require_converted_folder(folder)
    is_vlm = "vlm" in json.loads((folder / "surgery.json").read_text(encoding="utf-8"))
    if is_vlm and (layout != "hf" or int8 is not None):
        raise ModelInputError(f"{folder} is a vision-language model: export its vision encoder with "
                              "`--format onnx --layout hf` (onnx/vision_encoder.onnx, float; no --int8)")
    if layout == "hf":  # OUT/onnx must be a folder (or absent) before any work starts
        from .core.errors import OutputPathError
        from .core.output_format import ONNX_HF_DIR

        onnx_dir = folder / ONNX_HF_DIR
        if os.path.lexists(onnx_dir) and not onnx_dir.is_dir():
            raise OutputPathError(f"{onnx_dir} is in the way: the HF layout writes its files into a folder there, "
                                  "and that is not a folder (a file, special file or dangling link)")


def _require_converted_folder(out: Path) -> None:
    """A folder written by `convert` (it always holds surgery.json) whose files match its integrity record."""
    from .core.errors import IntegrityError
    from .core.integrity import verify_output
    from .core.output_format import SURGERY_FILE

    if not out.is_dir():
        raise ModelInputError(f"model folder not found: {out} (export works on a folder written by `convert`)")
    if not (out / SURGERY_FILE).is_file():
        raise ModelInputError(f"{out} is not a vit-surgery output (no {SURGERY_FILE}); export works on a folder "
                              "written by `vit-surgery convert`")
    if not verify_output(out):
        raise IntegrityError(f"{out} has no integrity record (written by an older vit-surgery, or surgery.json was "
                             "edited): run `vit-surgery convert` again to export it")


# ---- in memory -------------------------------------------------------------------------------------

def bake(
    model: nn.Module,
    neurons: Any = None,
    *,
    images: Optional[str | Path] = None,
    discovery: Optional[DiscoveryConfig] = None,
    num_registers: Optional[int] = None,
    scale: Optional[float] = None,
    mode: Optional[str] = None,
    progress: Progress = False,
) -> nn.Module:
    """A baked copy of an in-memory model (timm, open_clip, transformers, DINOv2 hub), as
    `timm.create_model` returns one: no files written, `model` left as it is.

    `neurons`: a Recipe, a {block: [units]} mapping, a neurons.json path or a published set name; or
    `images`: find them on `model` first. No parity check runs here: `convert` is the checked path."""
    from .backends import adapter_for
    from .core.bake import baked_copy
    from .core.recipe import validate_recipe_for_model

    if (neurons is None) == (images is None):
        raise UsageError("bake takes neurons= (a Recipe, {block: [units]}, a neurons.json or a published name) "
                         "or images=, exactly one")
    adapter = adapter_for(model)
    overrides = {"num_registers": num_registers, "scale": scale, "mode": mode}
    with _progress.reporting(_progress.for_api(progress)):
        if images is not None:
            from .core.discovery import find_register_neurons

            was_training = model.training
            model.eval()
            try:
                recipe = find_register_neurons(model, images, discovery or _default_discovery(), adapter=adapter,
                                               progress=True).recipe
            finally:
                model.train(was_training)
        else:
            recipe = _recipe_from(neurons)
        recipe = recipe.with_options(**overrides)
        blocks = adapter.blocks(model)
        validate_recipe_for_model(recipe, len(blocks), [adapter.mlp_width(b) for b in blocks], "neurons")
        with _progress.stage("baking"):
            return baked_copy(model, recipe, adapter=adapter).eval()


def _recipe_from(neurons: Any) -> Recipe:
    from .core.recipe import Recipe, read_neurons_file

    if isinstance(neurons, Recipe):
        return neurons
    if isinstance(neurons, Mapping):
        return Recipe({int(k): tuple(v) for k, v in neurons.items()})
    path = Path(str(neurons))
    if path.exists() or str(neurons).endswith(".json"):
        return read_neurons_file(path)[0]
    from .published import published_neurons

    return published_neurons(str(neurons))


def load(out: str | Path, *, device: str = "cpu") -> nn.Module:
    """A folder written by `convert`, as its own library's model (eval mode): a timm `VisionTransformer`,
    an open_clip `CLIP` (use `surgery.open_clip_load` for its preprocess too) or a transformers model.
    Built from the stock class with the recipe baked in; no remote code runs."""
    from .backends import load_model
    from .core.source import LoadOptions

    loaded = load_model(str(out), LoadOptions(device=device))
    if loaded.recipe is None:
        raise ModelInputError(f"{out} carries no baked test-time registers (not a vit-surgery output)")
    return loaded.extra.get("clip", loaded.model).eval()
