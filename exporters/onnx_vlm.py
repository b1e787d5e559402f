"""`vit-surgery export OUT --format onnx --layout hf` for a converted vision-language model (LLaVA,
PaliGemma):
`OUT/onnx/vision_encoder.onnx`, the piece ONNX VLM pipelines (transformers.js, optimum) run on the image,
so they can swap in the fixed vision encoder and keep their own embedding and decoder graphs.

  input   pixel_values [batch, 3, H, W] float32, preprocessed as the folder's processor says
  outputs image_features  [batch, image_tokens, text_hidden]  what the language model receives: the
                          projector's output (one row per `<image>` placeholder)
          vision_features [batch, image_tokens, vision_dim]   the projector's input: LLaVA, the tower's
                          `vision_feature_layer` output(s) with the VLM's select strategy applied;
                          PaliGemma, the tower's `last_hidden_state` (every token)

The test-time register(s) stay inside the tower and are removed before the selection, so the number of
image tokens is the source's. Validated like model.onnx (onnxruntime CPU, optimisation ALL, another
batch size than the export's) against the hooked reference on the un-baked VLM in float64, before it is
moved into place. LLaVA-NeXT packs its tiles' features outside such a graph (refused in one line).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.core.errors import ModelInputError

from surgery.core.output_format import FP32_TOLERANCE
from surgery.core.outputs import check_replaceable
from surgery.core import onnx_runtime
from surgery.core.progress import say_if
from .onnx_validate import OnnxReport, judge_runtime_outputs, validation_batches
from .onnx_spec import OnnxSpec, TensorSpec
from .onnx_export import fix_io_shapes, save_proto, export_first_that_works, replace_metadata
from .onnx_metadata import build_metadata
from .onnx_publish import publish_validated, record_parity_section, staged_output
from .runtime_check import RenamedSession

ONNX_DIR = "onnx"
VISION_ENCODER = "vision_encoder.onnx"
PIXEL_VALUES = TensorSpec("pixel_values", ("batch", "num_channels", "height", "width"),
                     doc="float32 images, preprocessed as the folder's processor says")
IMAGE_FEATURES = TensorSpec("image_features", ("batch", "image_tokens", "text_hidden_size"),
                    doc="the projector's output: one row per <image> placeholder, registers removed")
_VISION = TensorSpec("vision_features", ("batch", "image_tokens", "vision_hidden_size"),
                     doc="the projector's input: selected tower features, registers removed")
SPEC = OnnxSpec(inputs=(PIXEL_VALUES,), outputs=(IMAGE_FEATURES, _VISION))


# the VLM classes whose image features are one graph from pixel_values -> whether the projector takes every
# token of the tower's last_hidden_state (PaliGemma) rather than LLaVA's selected layers and tokens
_EVERY_TOKEN = {"LlavaForConditionalGeneration": False, "PaliGemmaForConditionalGeneration": True}


def is_vlm_folder(loaded: Any) -> bool:
    return hasattr(loaded.adapter, "forward_features_and_logits")


def _every_token(vlm: nn.Module) -> bool:
    return _EVERY_TOKEN[type(vlm).__name__]


class VisionEncoder(nn.Module):
    """pixel_values -> (image_features, vision_features): the VLM's tower (dropping its register rows),
    its feature selection and its projector."""

    def __init__(self, vlm: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        cfg = vlm.config
        self.tower, self.projector, self.dtype = vlm.model.vision_tower, vlm.model.multi_modal_projector, dtype
        self.every_token = _every_token(vlm)
        if not self.every_token:  # LLaVA: the selected layers, without CLS under `default`
            layer = cfg.vision_feature_layer
            self.layers = list(layer) if isinstance(layer, (list, tuple)) else [int(layer)]
            self.drop_cls = getattr(cfg, "vision_feature_select_strategy", "default") == "default"

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = pixel_values.to(self.dtype)
        if self.every_token:  # after the tower's post-layernorm, as PaliGemma's get_image_features takes it
            features = self.tower(pixel_values=pixels, return_dict=True).last_hidden_state
        else:
            out = self.tower(pixel_values=pixels, output_hidden_states=True, return_dict=True)
            chosen = [out.hidden_states[i] for i in self.layers]
            if self.drop_cls:
                chosen = [h[:, 1:] for h in chosen]
            features = torch.cat(chosen, dim=-1)
        return self.projector(features).float(), features.float()


def _export(loaded: Any, out_dir: Path, scratch: Path, exporter: str, progress: bool) -> Path:
    from surgery.core.weights import move_in_memory

    # a VLM read from its files keeps its language model there (meta): the graph is the tower + projector
    model = move_in_memory(copy.deepcopy(loaded.model), "cpu", torch.float32).eval()
    wrapper = VisionEncoder(model, torch.float32).eval()
    c, h, w = loaded.adapter.input_size(loaded.model)
    example = torch.randn(SPEC.export_batch_size, c, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = wrapper(example)
    shapes = {SPEC.input_names[0]: tuple(example.shape)}
    shapes.update({name: tuple(o.shape) for name, o in zip(SPEC.output_names, outs)})
    proto, name, _ = export_first_that_works(wrapper, example, SPEC, exporter, scratch, model, progress,
                                             what=VISION_ENCODER)
    fix_io_shapes(proto, SPEC, shapes)
    replace_metadata(proto, build_metadata(loaded, out_dir, dtype="float32", exporter=name, spec=SPEC,
                                           num_tokens=int(shapes[IMAGE_FEATURES.name][1])))
    path = scratch / VISION_ENCODER
    save_proto(proto, path, external=False)
    return path


def _validate(path: Path, loaded: Any, progress: bool) -> OnnxReport:
    """onnxruntime vs the hooked reference in float64: vision_features against the VLM's projector input
    (the judge's `image_features`), image_features against the VLM's own `get_image_features`."""
    session = onnx_runtime.open_session(path)
    names = [o.name for o in session.get_outputs()]

    def run(pixels: Any) -> dict[str, Any]:
        return dict(zip(names, session.run(names, {"pixel_values": pixels})))

    def projected(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        cfg = model.config
        if _every_token(model):
            out = model.model.get_image_features(pixel_values=x)
        else:
            out = model.model.get_image_features(pixel_values=x, vision_feature_layer=cfg.vision_feature_layer,
                                                 vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return torch.stack(list(out.pooler_output))

    report = OnnxReport(path=str(path), dtype="float32", tolerance=FP32_TOLERANCE, export_batch_size=2)
    say_if(progress, f"validating {path.name} in onnxruntime against the hooked reference")
    judge_runtime_outputs(report, RenamedSession(run, {"pooled": IMAGE_FEATURES.name, "tokens": _VISION.name}), loaded,
                          validation_batches(loaded), pooled=projected)
    for c in report.comparisons:
        c.output = {"pooled": IMAGE_FEATURES.name, "tokens": _VISION.name}[c.output]
    return report


def export_vision_encoder(out_dir: Path, *, loaded: Any, progress: bool = True, exporter: str = "dynamo",
                          overwrite: bool = False) -> tuple[OnnxReport, Path]:
    """Write OUT/onnx/vision_encoder.onnx, validated; returns its report and the onnx folder."""
    out_dir = Path(out_dir)
    if loaded.recipe is None:
        raise ModelInputError(f"{out_dir} carries no baked test-time registers (run `vit-surgery convert` first)")
    if type(loaded.model).__name__ not in _EVERY_TOKEN:
        raise ModelInputError(f"{out_dir}: vision_encoder.onnx is written for LLaVA and PaliGemma; a "
                              f"{type(loaded.model).__name__} packs its image features outside such a graph")
    target = out_dir / ONNX_DIR / VISION_ENCODER
    check_replaceable(target, overwrite)
    with staged_output(out_dir, ".onnx-vlm-export-") as scratch:
        path = _export(loaded, out_dir, scratch, exporter, progress)
        report = _validate(path, loaded, progress)
        report.path = str(target)
        publish_validated(report, f"ONNX export failed validation, nothing written: {report.summary()}", [])
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
        record_parity_section(out_dir, "onnx_hf_layout", {VISION_ENCODER: report.to_dict()}, create=True)
        return report, target.parent
