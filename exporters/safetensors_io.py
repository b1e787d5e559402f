"""safetensors with the recipe in the file's metadata (string -> string, deterministic)."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

METADATA_KEY = "vit_surgery"


def save_state_dict(state: Mapping[str, torch.Tensor], path: Path, surgery: dict[str, Any]) -> None:
    """Save contiguous, unshared copies (safetensors refuses shared storage) plus the recipe metadata."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    meta = {"format": "pt", METADATA_KEY: json.dumps(surgery, sort_keys=True)}
    save_file(tensors, str(path), metadata=meta)
    canonicalize_header(path)


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
