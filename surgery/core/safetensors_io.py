"""safetensors with the recipe in the file's metadata (string -> string, deterministic)."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors import safe_open

METADATA_KEY = "vit_surgery"


_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


def save_state_dict(state: Mapping[str, torch.Tensor], path: Path, surgery: Optional[dict[str, Any]]) -> None:
    """Write a safetensors file tensor by tensor, plus the recipe metadata.

    safetensors' own `save_file` serialises every tensor to bytes in memory first (a second copy of
    the model, a third with the unsharing clones); here each tensor goes to disk straight from its
    own storage, so writing costs one tensor. Same format (header sorted, data in key order);
    little-endian like every platform torch supports.
    """
    names = sorted(state)
    meta = {"format": "pt"}
    if surgery is not None:  # None: a plain file (benchmark fixtures)
        meta[METADATA_KEY] = json.dumps(surgery, sort_keys=True)
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for k in names:
        t = state[k]
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"{k}: dtype {t.dtype} cannot be written to safetensors")
        size = t.numel() * t.element_size()
        header[k] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # tensors start 8-byte aligned, as safetensors writes them
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for k in names:
            t = state[k].detach().to("cpu").contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t


def canonicalize_header(path: Path) -> None:
    """Rewrite the JSON header with sorted keys (same length, space padded).

    safetensors serialises its metadata map in hash order, which changes from process to process;
    sorting makes the same model give a byte-identical file.
    """
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > n:  # cannot happen for the same content; keep the original rather than corrupt it
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def read_metadata(path: Path) -> dict[str, Any]:
    """The recipe + provenance stored in a baked safetensors file ({} for other files)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    raw = meta.get(METADATA_KEY)
    return json.loads(raw) if raw else {}
