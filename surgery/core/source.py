"""What a loader hands on: the loaded model with its adapter, transform and source record.

Every backend's loader returns a LoadedModel; pipeline, checks and writers read only this record.
Library-free (torch + stdlib): the backends fill it in.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

from .adapter import Adapter
from .errors import ModelInputError
from .recipe import Recipe


@dataclass
class LoadOptions:
    allow_unsafe_pickle: bool = False  # full unpickling of .bin/.pt (runs code from the file)
    trust_remote_code: bool = False  # HF remote code (never on unless the user asks)
    device: str = "cpu"
    # convert's own check of the output it has just written: weights are mapped from the file (shared
    # with the page cache) instead of copied, and an open_clip output is rebuilt as its image tower only
    # (the text tower stays on the meta device; convert compares its written tensors with the source's)
    convert_check: bool = False


@dataclass
class LoadedModel:
    model: nn.Module
    family: Adapter
    spec: str
    source: dict[str, Any]
    transform: Callable
    recipe: Optional[Recipe] = None  # set when the model carries baked registers
    extra: dict[str, Any] = field(default_factory=dict)


_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")


def safetensors_dtype(path: Optional[Path | str]) -> Optional[str]:
    """The floating dtype a .safetensors file stores its weights in (from its header), or None."""
    import struct

    if path is None or not Path(path).is_file() or Path(path).suffix != ".safetensors":
        return None
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None
    kinds = [v.get("dtype") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    floats = [_SAFETENSORS_DTYPES[d] for d in kinds if d in _SAFETENSORS_DTYPES]
    return max(set(floats), key=floats.count) if floats else None


def torch_dtype(name: Optional[str]):  # -> torch.dtype
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}.get(name or "", torch.float32)


def require_finite_weights(loaded: LoadedModel) -> None:
    """NaN/Inf in the weights would make every output (and the parity check) meaningless: a user error."""
    import torch

    for name, t in loaded.model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelInputError(f"{loaded.spec}: the weights contain NaN or Inf ({name}); refusing to convert them")
