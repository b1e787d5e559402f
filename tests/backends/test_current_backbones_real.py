"""Real sizes (ViT-B) of today's backbones, random weights saved by each library's own writer:
convert (with a neurons file: random weights have no outliers) + check + ONNX export. Slow tier."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from surgery.cli import main

pytestmark = pytest.mark.slow
NEURONS = {"register_neurons": {"3": [5, 77], "4": [11]}}


def _timm(tmp: Path, arch: str) -> Path:
    import timm

    torch.manual_seed(0)
    timm.models.save_for_hf(timm.create_model(arch, pretrained=False).eval(), tmp / "src", safe_serialization=True)
    return tmp / "src"


def _hf_dinov3(tmp: Path) -> Path:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    cfg = DINOv3ViTConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          patch_size=16, image_size=224, num_register_tokens=4)
    DINOv3ViTModel(cfg).save_pretrained(tmp / "src")
    return tmp / "src"


def _hf_siglip(tmp: Path) -> Path:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             patch_size=16, image_size=224)  # siglip-base-patch16-224's vision tower
    SiglipVisionModel(cfg).save_pretrained(tmp / "src")
    return tmp / "src"


def _open_clip(tmp: Path, name: str) -> Path:
    import open_clip
    from open_clip.model import get_model_preprocess_cfg

    from surgery.organisms.families import save_open_clip_organism

    cfg = open_clip.get_model_config(name)
    cfg["text_cfg"] = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    cfg.pop("custom_text", None)
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg).eval()
    # open_clip's hub layout (its save_for_hf needs an HF tokenizer download); real-size image tower with
    # open_clip's own preprocessing for a model built from a config (no pretrained tag)
    model.organism_source = {"model_cfg": cfg, "preprocess_cfg": dict(get_model_preprocess_cfg(model))}
    return save_open_clip_organism(model, tmp / "src")


ROWS = {"timm_dinov3": lambda t: _timm(t, "vit_base_patch16_dinov3"),
        "timm_pe_core": lambda t: _timm(t, "vit_pe_core_base_patch16_224"),
        "hf_dinov3": _hf_dinov3,
        "hf_siglip": _hf_siglip,
        "open_clip_siglip2": lambda t: _open_clip(t, "ViT-B-16-SigLIP2"),
        "open_clip_pe_core": lambda t: _open_clip(t, "PE-Core-B-16")}


@pytest.mark.parametrize("row", list(ROWS))
def test_real_size_convert_check_onnx(row, tmp_path, capsys):
    src = ROWS[row](tmp_path)
    nf = tmp_path / "neurons.json"
    nf.write_text(json.dumps(NEURONS))
    out = tmp_path / "out"
    code = main(["convert", str(src), "--neurons", str(nf), "--out", str(out), "--onnx", "-q"])
    assert code == 0, capsys.readouterr().err
    parity = json.loads((out / "parity.json").read_text())
    assert parity["parity"]["passed"] and parity["parity"]["worst"]["error_over_allowed"] <= 1.0
    assert (out / "model.onnx").is_file()
    assert main(["check", str(out), "-q"]) == 0
