"""Source ONNX files for tests and benchmarks: each family's model organism exported by torch's exporters
(optionally passed through onnxruntime's transformer optimizer), i.e. the kind of file a user brings."""
from __future__ import annotations

import dataclasses
import tempfile
import warnings
from pathlib import Path
from typing import Any

from torch import nn

ORGANISMS = ("timm_clip", "timm_vit", "timm_reg4", "timm_siglip", "timm_swiglu", "open_clip", "open_clip_quickgelu",
             "hf_clip", "hf_dinov2", "hf_dinov2_reg", "hf_dinov2_swiglu", "hf_siglip")


def build_organism(name: str, seed: int = 0) -> tuple[nn.Module, Any]:
    """(model, planting) of an organism; the model is what the family adapter runs."""
    from . import families as of
    from .eva import build_hf_siglip_organism
    from .vit import build_timm_organism

    if name.startswith("timm_"):  # timm_swiglu: DINOv2-giant's packed SwiGLU (GluMlp) at organism width
        return build_timm_organism(seed, {"timm_clip": "clip", "timm_vit": "vit", "timm_reg4": "reg4",
                                          "timm_siglip": "siglip", "timm_swiglu": "swiglu"}[name])
    if name.startswith("open_clip"):
        model, planting = of.build_open_clip_organism(seed, quick_gelu=name.endswith("quickgelu"))
        return model.visual, planting
    if name == "hf_clip":
        return of.build_hf_clip_organism(seed)
    if name.startswith("hf_dinov2"):  # hf_dinov2_swiglu: Dinov2SwiGLUFFN (gate_proj / up_proj / down_proj)
        return of.build_hf_dinov2_organism(seed, num_register_tokens=4 if name.endswith("reg") else 0,
                                           swiglu=name.endswith("swiglu"))
    if name == "hf_siglip":  # SiglipVisionModel: no CLS, attention-pool head, tanh GELU. Width 96, not the
        # organisms' 64 = their token count: the head's sequence-first attention writes [N, ...] shape pieces
        # that are read as token counts only when N differs from the width (as in every real SigLIP)
        return build_hf_siglip_organism(seed, width=96)
    raise ValueError(f"unknown organism {name!r}; choose from {ORGANISMS}")


def export_source_onnx(model: nn.Module, out: Path, *, exporter: str = "dynamo", opset: int = 18,
                       optimize: str | None = None) -> Path:
    """`model` (unbaked) to `out` through torch's `exporter` at `opset` (vit-surgery's export wrapper:
    input pixel_values, outputs pooled and tokens, dynamic batch); `optimize`: an onnxruntime.transformers
    model_type ("vit", "clip") to apply its fused transformer optimisations afterwards."""
    import onnx

    from surgery.exporters.onnx_spec import VIT_ONNX_SPEC
    from surgery.exporters.onnx_export import export_graph

    from ..backends import adapter_for

    fam = adapter_for(model)
    spec = dataclasses.replace(VIT_ONNX_SPEC, opset=opset)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        g = export_graph(model, fam, Path(scratch), exporter=exporter, spec=spec, progress=False)
        if g.exporter != exporter:
            raise RuntimeError(f"the {exporter} exporter failed; got a {g.exporter} export")
        onnx.save(g.proto, str(out))
    if optimize:
        from onnxruntime.transformers import optimizer

        dim = fam.embed_dim(model)
        heads = fam.attention(fam.blocks(model)[0]).num_heads if hasattr(fam.attention(fam.blocks(model)[0]),
                                                                         "num_heads") else 0
        opt = optimizer.optimize_model(str(out), model_type=optimize, num_heads=heads, hidden_size=dim, opt_level=0)
        opt.save_model_to_file(str(out))
    return out


VARIANT_KINDS = ("fp16", "fp16_io32", "optimized_fp16", "int8_per_tensor", "int8_per_channel", "q4", "q4_asym")


def make_variant(src: Path, out: Path, kind: str, *, num_heads: int = 4, hidden_size: int = 64) -> Path:
    """A precision variant of the fp32 file `src`, written by the onnxruntime tool that makes it for the hub
    (`kind` in VARIANT_KINDS; num_heads / hidden_size for the transformer optimizer)."""
    import onnx

    if kind == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=False), str(out))
    elif kind == "fp16_io32":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(out))
    elif kind == "optimized_fp16":
        from onnxruntime.transformers import optimizer

        opt = optimizer.optimize_model(str(src), model_type="clip", num_heads=num_heads, hidden_size=hidden_size,
                                         opt_level=0)
        opt.convert_float_to_float16(keep_io_types=True)
        opt.save_model_to_file(str(out))
    elif kind in ("int8_per_tensor", "int8_per_channel"):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        per_channel = kind.endswith("channel")
        quantize_dynamic(str(src), str(out), per_channel=per_channel,
                         weight_type=QuantType.QInt8 if per_channel else QuantType.QUInt8)
    elif kind == "q4":
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq

        q = mnq.MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, is_symmetric=True)
        q.process()
        q.model.save_model_to_file(str(out))
    elif kind == "q4_asym":
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq

        q = mnq.MatMulNBitsQuantizer(onnx.load(str(src)), block_size=16, is_symmetric=False)
        q.process()
        q.model.save_model_to_file(str(out))
    else:
        raise ValueError(f"unknown variant {kind!r}; choose from {VARIANT_KINDS}")
    return out


def export_vision_encoder_source(vlm: nn.Module, out: Path, *, exporter: str = "dynamo", opset: int = 18) -> Path:
    """An *unbaked* LLaVA's or PaliGemma's `vision_encoder.onnx` as onnx-community / transformers.js ship it:
    input `pixel_values`, one output `image_features` (LLaVA: the tower's `vision_feature_layer` hidden
    state(s), the select strategy applied; PaliGemma: its last_hidden_state; through the multimodal
    projector), dynamic batch. Reuses the wrapper of
    vit-surgery's own vision-encoder export (exporters/onnx_vlm.py) on the unbaked model."""
    import onnx
    import torch

    from surgery.exporters.onnx_export import export_proto, fix_io_shapes
    from surgery.exporters.onnx_spec import OnnxSpec
    from surgery.exporters.onnx_vlm import IMAGE_FEATURES, PIXEL_VALUES, VisionEncoder

    class ImageFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = VisionEncoder(vlm, torch.float32)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.encoder(pixel_values)[0]

    spec = OnnxSpec(inputs=(PIXEL_VALUES,), outputs=(IMAGE_FEATURES,), opset=opset)
    wrapper = ImageFeatures().eval()
    size = vlm.config.vision_config.image_size
    example = torch.randn(spec.export_batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = wrapper(example)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        proto = export_proto(wrapper, example, spec, exporter, Path(scratch), progress=False)
    fix_io_shapes(proto, spec, {PIXEL_VALUES.name: tuple(example.shape), IMAGE_FEATURES.name: tuple(features.shape)})
    onnx.save(proto, str(out))
    return out


def export_vlm_language_side(vlm: nn.Module, onnx_dir: Path) -> list[Path]:
    """The language side of an ONNX VLM folder next to its vision encoder, as transformers.js names it:
    `embed_tokens.onnx` (input_ids -> inputs_embeds) and `decoder_model_merged.onnx` (inputs_embeds,
    attention_mask -> logits; without the past key/values a real export adds). Legacy torch exporter."""
    import torch

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm, self.head = vlm.model.language_model, vlm.lm_head

        def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
            return self.head(h)

    onnx_dir.mkdir(parents=True, exist_ok=True)
    seq = {0: "batch", 1: "sequence"}
    embed, decoder = onnx_dir / "embed_tokens.onnx", onnx_dir / "decoder_model_merged.onnx"
    width = vlm.config.text_config.hidden_size
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings
        torch.onnx.export(vlm.model.language_model.get_input_embeddings(), (torch.zeros(2, 5, dtype=torch.long),),
                          str(embed), dynamo=False, input_names=["input_ids"], output_names=["inputs_embeds"],
                          dynamic_axes={"input_ids": seq, "inputs_embeds": seq})
        torch.onnx.export(Decoder().eval(), (torch.randn(2, 5, width), torch.ones(2, 5, dtype=torch.long)),
                          str(decoder), dynamo=False, input_names=["inputs_embeds", "attention_mask"],
                          output_names=["logits"], dynamic_axes={"inputs_embeds": seq, "attention_mask": seq,
                                                                 "logits": seq})
    return [embed, decoder]


# optimum-onnx (the exporter of HF ONNX repos) pins transformers < 4.58 (pip install --dry-run optimum-onnx
# would downgrade transformers 5.x), so it is not a test dependency. `export_optimum_style` writes what its
# ViT-family ONNX config does for the feature-extraction task: the torchscript exporter, input
# `pixel_values` with dynamic axes (batch_size, num_channels, height, width), outputs `last_hidden_state`
# (batch_size, sequence_length) and `pooler_output` (batch_size), constant folding, eager attention, opset
# 14, config.json (the HF config) next to model.onnx.
OPTIMUM_OUTPUTS = ("last_hidden_state", "pooler_output")


def export_optimum_style(model: nn.Module, folder: Path, *, opset: int = 14) -> Path:
    """An HF vision model (`SiglipVisionModel`, ...) to folder/model.onnx + config.json + preprocessor_config.json,
    as optimum's exporter writes them (see above)."""
    import json

    import torch

    class _Outputs(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.inner(pixel_values=pixel_values)
            return out.last_hidden_state, out.pooler_output

    from .families import HF_ORGANISM_PREPROCESSOR

    folder.mkdir(parents=True, exist_ok=True)
    attn = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation("eager")
    try:
        size = int(model.config.image_size)
        x = torch.zeros(2, int(model.config.num_channels), size, size)
        out = folder / "model.onnx"
        with torch.no_grad():
            torch.onnx.export(_Outputs(model).eval(), (x,), str(out), dynamo=False, opset_version=opset,
                              do_constant_folding=True, input_names=["pixel_values"],
                              output_names=list(OPTIMUM_OUTPUTS),
                              dynamic_axes={"pixel_values": {0: "batch_size", 1: "num_channels", 2: "height",
                                                             3: "width"},
                                            "last_hidden_state": {0: "batch_size", 1: "sequence_length"},
                                            "pooler_output": {0: "batch_size"}})
    finally:
        if attn:
            model.set_attn_implementation(attn)
    model.config.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(HF_ORGANISM_PREPROCESSOR, indent=2) + "\n")
    return out
