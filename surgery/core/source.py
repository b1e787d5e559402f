"""What a loader hands on: the loaded model with its adapter, transform and source record.

Every backend's loader returns a LoadedModel; pipeline, checks and writers read only this record.
Library-free (torch + stdlib): the backends fill it in.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from torch import nn

from .adapter import Adapter
from .errors import ModelInputError
from .recipe import Recipe


@dataclass
class SourceInfo:
    """What built the source model, as its loader found it: what a writer needs to write an output the
    source's library rebuilds (written to surgery.json as `source`, and read back from it).

    Fields are per library; `to_dict` writes the set fields (and the keys a library always records,
    even when null) under the JSON names of earlier versions, so files stay byte-identical.
    """

    library: str  # "timm", "open_clip" or "hf": which backend writes the output
    spec: Optional[str] = None  # MODEL as the user typed it
    dtype: Optional[str] = None  # the checkpoint's floating dtype (float32 / float16 / bfloat16)
    base_model: Optional[str] = None  # the hub repo the weights came from (model card)
    converted_from: Optional[str] = None  # the spec a re-expression (`--to timm`) was made from
    # timm: what `timm.create_model` needs to rebuild the model
    architecture: Optional[str] = None
    model_args: Optional[dict[str, Any]] = None
    pretrained_cfg: Optional[dict[str, Any]] = None  # resolved: head, input size, labels, preprocessing
    checkpoint_layout: Optional[str] = None  # "dinov2-torch-hub" when loaded from a torch-hub checkpoint
    # open_clip: the model config and preprocessing written to open_clip_config.json
    model_name: Optional[str] = None
    pretrained: Optional[str] = None
    quick_gelu: Optional[bool] = None
    model_cfg: Optional[dict[str, Any]] = None
    preprocess_cfg: Optional[dict[str, Any]] = None
    # HF transformers: the stock class and its preprocessing
    hf_class: Optional[str] = None  # JSON key "class"
    model_type: Optional[str] = None
    name_or_path: Optional[str] = None
    preprocess: Optional[dict[str, Any]] = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a surgery.json this version does not know

    _JSON_NAMES: ClassVar[dict[str, str]] = {"hf_class": "class"}
    # keys a library's loader always records (null included)
    _ALWAYS: ClassVar[dict[str, tuple[str, ...]]] = {
        "open_clip": ("spec", "model_name", "pretrained", "quick_gelu", "model_cfg", "preprocess_cfg", "dtype"),
        "hf": ("hf_class", "model_type", "name_or_path", "spec", "preprocess", "dtype"),
        "timm": ("architecture", "model_args", "pretrained_cfg"),
    }

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the `source` of surgery.json)."""
        always = self._ALWAYS.get(self.library, ())
        out: dict[str, Any] = {"library": self.library}
        for f in fields(self):
            if f.name in ("library", "extra"):
                continue
            value = getattr(self, f.name)
            if value is not None or f.name in always:
                out[self._JSON_NAMES.get(f.name, f.name)] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], library: str) -> "SourceInfo":
        """Read back a `source` record (a surgery.json written by any version); `library` wins."""
        names = {cls._JSON_NAMES.get(f.name, f.name): f.name for f in fields(cls) if f.name not in ("library", "extra")}
        known = {names[k]: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "library"}
        return cls(library=library, extra=extra, **known)


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
    adapter: Adapter
    spec: str
    source: SourceInfo
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
        if t.device.type != "meta" and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelInputError(f"{loaded.spec}: the weights contain NaN or Inf ({name}); refusing to convert them")
