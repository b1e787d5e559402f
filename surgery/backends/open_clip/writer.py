"""Writes a baked open_clip model as an open_clip model folder (the layout of open_clip's hf-hub repos).

OUT/open_clip_config.json      {"model_cfg": ..., "preprocess_cfg": ...} (open_clip's own format)
OUT/open_clip_model.safetensors the whole CLIP state dict: baked image tower, text tower untouched
                                (recipe + provenance also in the safetensors metadata)
OUT/surgery.json               recipe + provenance; tells the loader how to rebuild the baked structure

Load it with `surgery.open_clip_load(OUT) -> (model, preprocess)`. Plain
`open_clip.create_model_from_pretrained('local-dir:OUT')` fails loudly (strict load: the baked tower has
extra keys) instead of silently returning an unfixed model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from surgery.core.safetensors_io import save_state_dict

from ...core.output_format import write_json, write_surgery_json
from ...core.source import SourceInfo
from ..base import copy_extra_files

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def combined_state_dict(clip: nn.Module, visual: nn.Module) -> dict[str, Any]:
    """`clip`'s state dict with its image tower's entries replaced by `visual`'s (the same tensors
    everywhere else, so the text tower is written byte for byte)."""
    dtype = next(visual.parameters()).dtype  # the text tower is written in the image tower's dtype
    state = {k: (v.to(dtype) if v.is_floating_point() else v)
             for k, v in clip.state_dict().items() if not k.startswith("visual.")}
    state.update({f"visual.{k}": v for k, v in visual.state_dict().items()})
    return state


def write_open_clip_dir(clip: nn.Module, visual: nn.Module, out_dir: Path, *, source: SourceInfo,
                        surgery: dict[str, Any]) -> list[Path]:
    """Save the CLIP model `clip` with image tower `visual` (baked) as an open_clip folder."""
    if source.model_cfg is None:
        raise ValueError("open_clip export needs source.model_cfg (written by the open_clip loader)")
    config = {"model_cfg": source.model_cfg, "preprocess_cfg": source.preprocess_cfg or {}}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / CONFIG_NAME, config)
    save_state_dict(combined_state_dict(clip, visual), out_dir / WEIGHTS_NAME, surgery)
    return [out_dir / CONFIG_NAME, out_dir / WEIGHTS_NAME, write_surgery_json(out_dir, surgery)]


def write(model: nn.Module, out: Path, loaded: Any, surgery: dict[str, Any]) -> list[Path]:
    """The backend's writer: `model` is the baked image tower, `loaded.extra['clip']` the source CLIP."""
    clip = loaded.extra.get("clip")
    if clip is None:
        raise ValueError("open_clip export needs the whole CLIP model (LoadedModel.extra['clip'])")
    files = write_open_clip_dir(clip, model, out, source=loaded.source, surgery=surgery)
    return files + copy_extra_files(loaded, out)  # tokenizer files travel with the model

