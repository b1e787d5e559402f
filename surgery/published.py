"""Published register neurons, usable with `--neurons NAME` without calibration images.

Adding a model is one entry in data/published_neurons.json: {"name": {"register_neurons": ...,
"models": [names it applies to], "source": "..."}}.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from .core.errors import NeuronsFileError
from .core.recipe import Recipe

_FILE = Path(__file__).parent / "data" / "published_neurons.json"


@lru_cache(maxsize=1)
def registry() -> dict[str, Any]:
    return json.loads(_FILE.read_text(encoding="utf-8"))


def published_neurons(name: str) -> Recipe:
    reg = registry()
    if name not in reg:
        raise NeuronsFileError(f"--neurons {name!r}: not a file and not a published set ({', '.join(sorted(reg))})")
    return Recipe.from_dict(reg[name], source=f"published set {name}")


def match_published(model_name: str) -> Optional[str]:
    """The published set whose `models` list names this model (timm / open_clip / HF names), if any."""
    low = model_name.lower()
    for name, entry in registry().items():
        if any(m.lower() in low for m in entry.get("models", [])):
            return name
    return None


def published_for_model(loaded: Any) -> Optional[str]:
    """The published set for a loaded model, recognised by name (spec, architecture, hub id) and checked
    against the entry's optional `depth`, `hidden_size` and `num_prefix_tokens` (default 1: a set found
    on a model without trained registers never applies to its `reg4` / with-registers sibling)."""
    src = loaded.source
    names = [loaded.spec] + [str(v) for v in (src.architecture, src.name_or_path, src.spec) if v]
    fam, model = loaded.adapter, loaded.model
    blocks = fam.blocks(model)
    for n in names:
        name = match_published(n)
        if name is None:
            continue
        entry = registry()[name]
        if entry.get("depth") is not None and int(entry["depth"]) != len(blocks):
            continue
        if entry.get("hidden_size") is not None and any(fam.mlp_width(b) != int(entry["hidden_size"]) for b in blocks):
            continue
        if int(entry.get("num_prefix_tokens", 1)) != fam.num_prefix_tokens(model):
            continue
        return name
    return None
