"""vit-surgery's metadata properties of an exported ONNX file: the recipe and token layout, written by
the export (`build_metadata`) and read back by validation and `check` (`read_onnx_metadata`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from surgery import __version__
from surgery.core.errors import ModelInputError, first_line

from .onnx_spec import FORMAT_VERSION, META_PREFIX, OnnxSpec


def _surgery_doc(out_dir: Path) -> dict[str, Any]:
    try:
        doc = json.loads((out_dir / "surgery.json").read_text(encoding="utf-8"))
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def token_layout(loaded: Any) -> dict[str, Any]:
    """Where the tokens of the `tokens` output come from (the baked model's own bookkeeping)."""
    from surgery.core.bake import register_token_indices

    fam, model = loaded.adapter, loaded.model
    regs = register_token_indices(model, adapter=fam)
    leading = fam.num_prefix_tokens(model)  # prefix + test-time registers in a baked model
    return {"num_prefix_tokens": leading - len(regs), "num_registers": len(regs), "register_indices": regs,
            "first_patch_index": leading, "order": "[prefix (CLS, trained registers) | test-time registers | patches]"}


def build_metadata(loaded: Any, out_dir: Path, *, dtype: str, exporter: str, spec: OnnxSpec,
                   num_tokens: int) -> dict[str, str]:
    """The metadata properties written into model.onnx (all values are strings; JSON where structured)."""
    doc = _surgery_doc(out_dir)
    layout = token_layout(loaded)
    layout["num_tokens"] = num_tokens
    cfg = dict(loaded.source.pretrained_cfg or {})
    preprocess = {k: cfg[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
                  if k in cfg}
    meta = {
        "format_version": FORMAT_VERSION,
        "recipe": json.dumps(loaded.recipe.to_dict(), sort_keys=True),
        "token_layout": json.dumps(layout, sort_keys=True),
        "register_token_indices": json.dumps(layout["register_indices"]),
        "num_prefix_tokens": str(layout["num_prefix_tokens"]),
        "num_registers": str(layout["num_registers"]),
        "source_model": str(doc.get("source_model") or loaded.spec),
        "source": json.dumps(doc.get("source", loaded.source.to_dict()), sort_keys=True, default=str),
        "family": loaded.adapter.name,
        "tool": "vit-surgery",
        "tool_version": __version__,
        "dtype": dtype,
        "exporter": f"torch {torch.__version__} {exporter}",
        "export_batch_size": str(spec.export_batch_size),
        "interface": json.dumps(spec.describe(), sort_keys=True),
        "preprocess": json.dumps(preprocess, sort_keys=True),
    }
    return {META_PREFIX + k: v for k, v in meta.items()}


_JSON_KEYS = {"recipe", "token_layout", "register_token_indices", "source", "interface", "preprocess",
              "float64_register_branch"}
_INT_KEYS = {"num_prefix_tokens", "num_registers", "export_batch_size"}


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """vit-surgery's metadata properties of an ONNX file, decoded (prefix dropped). Weights not loaded."""
    model = _load_proto(Path(path), load_external_data=False)
    out: dict[str, Any] = {}
    for p in model.metadata_props:
        if not p.key.startswith(META_PREFIX):
            continue
        key = p.key[len(META_PREFIX):]
        try:
            out[key] = json.loads(p.value) if key in _JSON_KEYS else int(p.value) if key in _INT_KEYS else p.value
        except ValueError:
            raise ModelInputError(f"{path}: metadata property {p.key} is malformed") from None
    return out


def _load_proto(path: Path, load_external_data: bool) -> Any:
    import onnx

    if not path.is_file():
        raise ModelInputError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as e:  # DecodeError, OSError, ValidationError for a bad external-data reference, ...
        raise ModelInputError(f"{path}: not a readable ONNX model ({type(e).__name__}: {first_line(e)}); "
                              "re-export it with `vit-surgery export OUT --format onnx --overwrite`") from None

