"""The HF `config.json` that sits next to an ONNX file, or above its `onnx/` folder (HF ONNX repos and
optimum's exporter write one there). The graph alone does not say everything: an optimum export takes any
image size (symbolic height / width) though its positional table fixes one, and an HF SigLIP head's
treatment of extra tokens is a property of the HF model, not of the graph."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..core.errors import ModelInputError


def config_file(onnx_path: Path) -> Optional[Path]:
    folder = onnx_path.parent
    for f in (folder / "config.json", folder.parent / "config.json" if folder.name == "onnx" else None):
        if f is not None and f.is_file():
            return f
    return None


def sibling_config(onnx_path: Path) -> dict[str, Any]:
    """The config (the vision part of a composite one), or {} when there is none."""
    f = config_file(onnx_path)
    if f is None:
        return {}
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelInputError(f"{f}: unreadable ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise ModelInputError(f"{f}: not a JSON object")
    vision = doc.get("vision_config")
    return dict(vision, model_type=doc.get("model_type", "")) if isinstance(vision, dict) else doc


def configured_image_size(onnx_path: Path) -> Optional[tuple[int, int, int]]:
    """(channels, height, width) from the config's `image_size` (+ `num_channels`), else None."""
    cfg = sibling_config(onnx_path)
    size = cfg.get("image_size")
    if isinstance(size, int) and size > 0:
        return int(cfg.get("num_channels", 3)), size, size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return int(cfg.get("num_channels", 3)), int(size[0]), int(size[1])
    return None
