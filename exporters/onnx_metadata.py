"""vit-surgery's metadata properties of an exported ONNX file: the recipe and token layout, written by
the export (`build_metadata`) and read back by validation and `check` (`read_onnx_metadata`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from surgery import __version__
from surgery.core.errors import ModelInputError, first_line

from surgery.core.output_format import OnnxMetadata, read_surgery_json, require_onnx_path

from .onnx_spec import OnnxSpec


def _surgery_doc(out_dir: Path) -> dict[str, Any]:
    try:
        return read_surgery_json(out_dir) or {}
    except ModelInputError:  # the export records what it can; `check` reports a damaged surgery.json
        return {}


def token_layout(loaded: Any) -> dict[str, Any]:
    """Where the tokens of the `tokens` output come from (the baked model's own bookkeeping)."""
    from surgery.core.bake import register_token_indices

    fam, model = loaded.adapter, loaded.model
    regs = register_token_indices(model, adapter=fam)
    leading = fam.num_prefix_tokens(model)  # prefix + test-time registers in a baked model
    # num_prefix_tokens as the model's own attribute counts them (registers included: patches are
    # tokens[:, num_prefix_tokens:]); num_source_prefix_tokens is the source's (CLS, trained registers)
    return {"num_prefix_tokens": leading, "num_source_prefix_tokens": leading - len(regs),
            "num_registers": len(regs), "register_indices": regs,
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
    return OnnxMetadata(
        recipe=loaded.recipe.to_dict(), token_layout=layout, register_token_indices=layout["register_indices"],
        num_prefix_tokens=layout["num_prefix_tokens"], num_source_prefix_tokens=layout["num_source_prefix_tokens"],
        num_registers=layout["num_registers"],
        source_model=str(doc.get("source_model") or loaded.spec), source=doc.get("source", loaded.source.to_dict()),
        family=loaded.adapter.name, tool_version=__version__, dtype=dtype,
        exporter=f"torch {torch.__version__} {exporter}", export_batch_size=spec.export_batch_size,
        interface=spec.describe(), preprocess=preprocess).to_props()


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """vit-surgery's metadata properties of an ONNX file, decoded (prefix dropped). Weights not loaded."""
    model = load_proto(Path(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    return OnnxMetadata.from_props(props, str(path)).as_dict()


def load_proto(path: Path, load_external_data: bool) -> Any:
    import onnx

    require_onnx_path(path)
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as e:  # DecodeError, OSError, ValidationError for a bad external-data reference, ...
        raise ModelInputError(f"{path}: not a readable ONNX model ({type(e).__name__}: {first_line(e)}); "
                              "re-export it with `vit-surgery export OUT --format onnx --overwrite`") from None

