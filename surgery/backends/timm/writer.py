"""Writes a baked timm model as a timm local-dir: config.json + model.safetensors + surgery.json."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from surgery.core.safetensors_io import save_state_dict

from ...core.output_format import write_json, write_surgery_json
from ...core.source import SourceInfo
from .baked import BAKED_ARCH


def write_timm_dir(model: nn.Module, out_dir: Path, *, source: SourceInfo, surgery: dict[str, Any]) -> list[Path]:
    """Save `model` (baked, timm) so `timm.create_model('local-dir:OUT', pretrained=True)` rebuilds it
    after `import surgery`. `surgery` is the recipe + provenance dict (written to surgery.json too)."""
    recipe = model.surgery_recipe
    cfg = dict(source.pretrained_cfg or {})
    cfg["architecture"] = BAKED_ARCH
    config = {
        "architecture": BAKED_ARCH,
        "num_classes": int(getattr(model, "num_classes", 0)),
        "num_features": int(getattr(model, "num_features", 0)),
        "model_args": {
            "source_architecture": source.architecture,
            "source_model_args": source.model_args if source.model_args is not None else {},
            "surgery": recipe.to_dict(),
        },
        "pretrained_cfg": cfg,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", config)
    save_state_dict(model.state_dict(), out_dir / "model.safetensors", surgery)
    return [out_dir / "config.json", out_dir / "model.safetensors", write_surgery_json(out_dir, surgery)]


def write(model: nn.Module, out: Path, loaded: Any, surgery: dict[str, Any]) -> list[Path]:
    """The backend's writer (see surgery.backends.base.Writer)."""
    return write_timm_dir(model, out, source=loaded.source, surgery=surgery)
