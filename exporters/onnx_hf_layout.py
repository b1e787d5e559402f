"""`vit-surgery export OUT --format onnx --layout hf`: the layout of HF ONNX repos (optimum, transformers.js).

For a folder written from an HF transformers model (CLIPVisionModel, CLIPVisionModelWithProjection,
CLIPModel's image side, Dinov2Model, Dinov2WithRegistersModel), next to its `config.json` and
`preprocessor_config.json`:

  onnx/model.onnx        input pixel_values [batch, 3, H, W] float32
                         outputs last_hidden_state [batch, N, D] (register token(s) included, as in the
                         PyTorch model), pooler_output [batch, D], and image_embeds [batch, E] for CLIP
                         with a projection (CLIPModel, CLIPVisionModelWithProjection)
  onnx/model_fp16.onnx   with --fp16: the same graph computing in float16 (float32 interface)

The config keeps the standard `model_type` (clip_vision_model, clip, dinov2, ...): runtimes that pick a
class from it (optimum's ORTModelForFeatureExtraction, transformers.js) only run the graph, so the
`auto_map` remote code is not needed there. Every file is validated like model.onnx (onnxruntime CPU,
optimisation ALL, a batch size other than the export's, against the PyTorch baked model and the hooked
reference; 1e-5 fp32, 2e-2 fp16) before it is moved into place.

timm and open_clip outputs have no transformers config to put next to the graph; for them use the
plain layout (`OUT/model.onnx`), or convert an HF model (`hf:...`, or `--to timm` the other way round).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from surgery.core.errors import ModelInputError

from .base import ExportOptions
from .onnx_export import fix_io_shapes, save_proto, export_first_that_works, replace_metadata
from .onnx_metadata import build_metadata
from .onnx_patches import mha_fastpath_disabled
from .onnx_publish import publish_validated, record_parity_section, staged_output
from surgery.core.output_format import FP16_TOLERANCE, FP32_TOLERANCE, META_PREFIX, ONNX_HF_DIR, ONNX_HF_FILES
from surgery.core.outputs import check_replaceable
from surgery.core import onnx_runtime
from surgery.core.progress import say_if

from .onnx_spec import OnnxSpec, TensorSpec
from .onnx_validate import OnnxReport, judge_runtime_outputs, validation_batches
from .runtime_check import RenamedSession

ONNX_DIR, FILES = ONNX_HF_DIR, ONNX_HF_FILES
_PIXELS = TensorSpec("pixel_values", ("batch", "num_channels", "height", "width"),
                     doc="float32 images, preprocessed as preprocessor_config.json says")
_HIDDEN = TensorSpec("last_hidden_state", ("batch", "sequence_length", "hidden_size"),
                     doc="final tokens: [CLS, trained registers, test-time registers, patches]")
_POOLER = TensorSpec("pooler_output", ("batch", "hidden_size"), doc="the model's pooler_output")
_EMBEDS = TensorSpec("image_embeds", ("batch", "projection_dim"), doc="CLIP image embedding (projection)")


def _vision_and_projection(model: nn.Module) -> tuple[nn.Module, Optional[nn.Module]]:
    """The module returning last_hidden_state / pooler_output, and CLIP's visual projection if any."""
    if hasattr(model, "vision_model") and hasattr(model, "visual_projection"):
        return model.vision_model, model.visual_projection  # CLIPModel, CLIPVisionModelWithProjection
    return model, None


class HFOutputs(nn.Module):
    """pixel_values -> (last_hidden_state, pooler_output[, image_embeds]) in float32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.vision, self.projection = _vision_and_projection(model)
        self.dtype = dtype

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.vision(pixel_values=pixel_values.to(self.dtype), return_dict=True)
        res = [out.last_hidden_state.float(), out.pooler_output.float()]
        if self.projection is not None:
            res.append(self.projection(out.pooler_output).float())
        return tuple(res)


def hf_spec(model: nn.Module) -> OnnxSpec:
    has_projection = _vision_and_projection(model)[1] is not None
    return OnnxSpec(inputs=(_PIXELS,), outputs=(_HIDDEN, _POOLER) + ((_EMBEDS,) if has_projection else ()))


def export_hf_graph(loaded: Any, out_dir: Path, scratch: Path, fp16: bool, exporter: str, progress: bool) -> Path:
    """scratch/model.onnx (or model_fp16.onnx) with the HF output names and vit-surgery's metadata."""
    dtype = torch.float16 if fp16 else torch.float32
    model = copy.deepcopy(loaded.model).to("cpu", dtype).eval()
    spec = hf_spec(model)
    wrapper = HFOutputs(model, dtype).eval()
    c, h, w = loaded.adapter.input_size(loaded.model)
    example = torch.randn(spec.export_batch_size, c, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), mha_fastpath_disabled():
        outs = wrapper(example)
    shapes = {spec.input_names[0]: tuple(example.shape)}
    shapes.update({name: tuple(o.shape) for name, o in zip(spec.output_names, outs)})
    proto, name, _ = export_first_that_works(wrapper, example, spec, exporter, scratch, model, progress,
                                             what="ONNX (HF layout)",
                                             detail=f" ({'float16' if fp16 else 'float32'})")
    fix_io_shapes(proto, spec, shapes)
    replace_metadata(proto, build_metadata(loaded, out_dir, dtype="float16" if fp16 else "float32", exporter=name,
                                           spec=spec, num_tokens=int(shapes[_HIDDEN.name][1])))
    path = scratch / FILES["float16" if fp16 else "float32"]
    save_proto(proto, path, external=False)
    return path


def _validate(path: Path, loaded: Any, fp16: bool, progress: bool, batches: Optional[list[Any]] = None) -> OnnxReport:
    """onnxruntime on the graph vs PyTorch and the hooked reference (see validate_hf_outputs)."""
    session = onnx_runtime.open_session(path)
    names = [o.name for o in session.get_outputs()]

    def run(pixels: Any) -> dict[str, Any]:
        return dict(zip(names, session.run(names, {"pixel_values": pixels})))

    say_if(progress, f"validating {path.name} in onnxruntime against PyTorch and the hooked reference")
    return validate_hf_outputs(run, path, loaded, FP16_TOLERANCE if fp16 else FP32_TOLERANCE,
                               "float16" if fp16 else "float32", batches)


def validate_hf_outputs(run: Any, path: Path, loaded: Any, tol: float, dtype: str = "float32",
                        batches: Optional[list[Any]] = None) -> OnnxReport:
    """A runtime's HF-named outputs (`run(pixels) -> {name: array}`) vs PyTorch and the hooked reference:
    last_hidden_state and pooler_output, then image_embeds (when present) in a second pass under the
    pooled slot. Shared by the ONNX HF layout and the OpenVINO IR of an HF folder."""
    projection = _vision_and_projection(loaded.model)[1]
    batches = batches if batches is not None else validation_batches(loaded)

    def pooler(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _vision_and_projection(model)[0](pixel_values=x, return_dict=True).pooler_output

    def embeds(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        v, p = _vision_and_projection(model)
        return p(v(pixel_values=x, return_dict=True).pooler_output)

    report = OnnxReport(path=str(path), dtype=dtype, tolerance=tol, export_batch_size=2)
    judge_runtime_outputs(report, RenamedSession(run, {"pooled": _POOLER.name, "tokens": _HIDDEN.name}), loaded,
                          batches, pooled=pooler)
    for c in report.comparisons:
        c.output = {"pooled": _POOLER.name, "tokens": _HIDDEN.name}[c.output]
    if projection is not None and report.passed:
        extra = OnnxReport(path=str(path), dtype=report.dtype, tolerance=tol, export_batch_size=2)
        judge_runtime_outputs(extra, RenamedSession(run, {"pooled": _EMBEDS.name, "tokens": _HIDDEN.name}), loaded,
                              batches, pooled=embeds)
        report.problems += extra.problems
        report.comparisons += [c for c in extra.comparisons if c.output == "pooled"]
        for c in report.comparisons:
            c.output = _EMBEDS.name if c.output == "pooled" else c.output
    return report


def export_hf_layout(out_dir: Path, *, loaded: Any, fp16: bool = False, progress: bool = True,
                     exporter: str = "dynamo", overwrite: bool = False) -> tuple[OnnxReport, Path]:
    """Write OUT/onnx/model.onnx (and model_fp16.onnx with fp16), validated; returns the last report."""
    out_dir = Path(out_dir)
    from .onnx_vlm import export_vision_encoder, is_vlm_folder

    if is_vlm_folder(loaded):  # a VLM: its vision encoder (onnx/vision_encoder.onnx), float32
        if fp16:
            raise ModelInputError("{fp16} is not offered for a VLM's vision_encoder.onnx", parameters=("fp16",))
        return export_vision_encoder(out_dir, loaded=loaded, progress=progress, exporter=exporter, overwrite=overwrite)
    if loaded.recipe is None:
        raise ModelInputError(f"{out_dir} carries no baked test-time registers (run `vit-surgery convert` first)")
    if loaded.source.library != "hf":
        raise ModelInputError(f"{{layout}} hf needs a folder converted from an HF transformers model (its "
                              f"config.json and preprocessor_config.json go with the graph); {out_dir} is a "
                              f"{loaded.source.library} folder: use {{layout}} plain", parameters=("layout",))
    dtypes = ["float32"] + (["float16"] if fp16 else [])
    targets = [out_dir / ONNX_DIR / FILES[d] for d in dtypes]
    for t in targets:
        check_replaceable(t, overwrite)
    with staged_output(out_dir, ".onnx-hf-export-") as scratch:
        reports = []
        for d in dtypes:
            path = export_hf_graph(loaded, out_dir, scratch, d == "float16", exporter, progress)
            report = _validate(path, loaded, d == "float16", progress)
            report.path = str(out_dir / ONNX_DIR / path.name)
            publish_validated(report, f"ONNX export failed validation, nothing written: {report.summary()}", [])
            reports.append(report)
        (out_dir / ONNX_DIR).mkdir(exist_ok=True)
        for d in dtypes:  # only once every dtype passed
            os.replace(scratch / FILES[d], out_dir / ONNX_DIR / FILES[d])
        _record(out_dir, reports)
        return reports[-1], out_dir / ONNX_DIR


def validate_hf_layout(out_dir: Path, loaded: Any, batches: list[Any]) -> list[OnnxReport]:
    """Re-validate every file of OUT/onnx/ (what `check` does with every format present); a file exported
    with another recipe than OUT's model is reported stale."""
    from .onnx_metadata import read_onnx_metadata

    reports = []
    for dtype, name in ONNX_HF_FILES.items():
        path = Path(out_dir) / ONNX_HF_DIR / name
        if not path.is_file():
            continue
        if read_onnx_metadata(path).get("recipe") != loaded.recipe.to_dict():
            report = OnnxReport(path=str(path), dtype=dtype, tolerance=FP16_TOLERANCE if dtype == "float16" else
                                FP32_TOLERANCE, export_batch_size=2)
            report.problems.append(f"{path.name} was exported with another recipe than the model in {out_dir} "
                                   "(stale export); re-export it with --overwrite")
        else:
            report = _validate(path, loaded, dtype == "float16", False, batches)
            report.path = str(path)
        reports.append(report)
    return reports


def _record(out_dir: Path, reports: list[OnnxReport]) -> None:
    record_parity_section(out_dir, "onnx_hf_layout", {Path(r.path).name: r.to_dict() for r in reports}, create=True)


__all__ = ["FILES", "META_PREFIX", "ONNX_DIR", "export_hf_graph", "export_hf_layout", "hf_spec", "validate_hf_layout", "validate_hf_outputs", "export_format", "open_session", "validate_present"]


# ---- the format registry's entry points (exporters/base.py) --------------------------------------

def export_format(out_dir: Path, loaded: Any, options: ExportOptions) -> OnnxReport:
    return export_hf_layout(out_dir, loaded=loaded, fp16=options.fp16, progress=options.progress,
                            exporter=options.exporter, overwrite=options.overwrite)[0]


def open_session(path: Path) -> Any:
    return onnx_runtime.open_session(path)


validate_present = validate_hf_layout
