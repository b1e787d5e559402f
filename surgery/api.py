"""The one-call Python API, mirroring the CLI: `surgery.convert(...)` and `surgery.load(out)`.

`convert` takes what `vit-surgery convert MODEL` takes (a spec string or folder) or an in-memory timm /
transformers model, which is first written with its own library's writer (timm `save_for_hf`,
transformers `save_pretrained`) to a temporary folder and loaded back through the same loader the CLI
uses, so the output folder is what the CLI would write for that model. Errors are `SurgeryError`s
with the CLI's messages (their `exit_code` is the CLI's).
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from torch import nn

from .core.discovery import DiscoveryConfig
from .core.errors import ModelInputError
from .core.source import LoadedModel, LoadOptions
from .backends import load_model
from .core.parity import FP32_TOLERANCE
from .pipeline import ConvertResult, export_formats_hook, run_convert


@contextlib.contextmanager
def _as_loaded(model_or_spec: Any, options: LoadOptions) -> Iterator[LoadedModel]:
    if isinstance(model_or_spec, LoadedModel):
        yield model_or_spec
    elif isinstance(model_or_spec, (str, Path)):
        yield load_model(str(model_or_spec), options)
    elif isinstance(model_or_spec, nn.Module):
        with tempfile.TemporaryDirectory(prefix="vit-surgery-src-") as tmp:
            spec = _save_in_own_format(model_or_spec, Path(tmp) / "model")
            loaded = load_model(str(spec), options)
            loaded.spec = _describe(model_or_spec)
            hub = (getattr(model_or_spec, "pretrained_cfg", None) or {}).get("hf_hub_id")
            if hub:  # where the weights came from: the model card's base_model
                loaded.source.base_model = hub
            yield loaded
    else:
        raise ModelInputError(f"convert takes a model spec, a folder or a timm / transformers model, "
                              f"not {type(model_or_spec).__name__}")


def _save_in_own_format(model: nn.Module, folder: Path) -> Path:
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):  # transformers PreTrainedModel
        model.save_pretrained(folder, safe_serialization=True)
        return folder
    if hasattr(model, "pretrained_cfg"):  # built by timm.create_model
        from timm.models import save_for_hf

        save_for_hf(model, str(folder), safe_serialization=True)
        return folder
    raise ModelInputError(f"an in-memory {type(model).__name__} cannot be converted: pass the model spec "
                          "(e.g. 'open_clip:ViT-B-16/laion2b_s34b_b88k') or a model folder instead")


def _describe(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("hf_hub_id") or cfg.get("architecture")
    if name is None and hasattr(model, "config"):
        name = getattr(model.config, "_name_or_path", "") or model.config.model_type
    return f"<in-memory {type(model).__name__}{' ' + name if name else ''}>"


def convert(
    model_or_spec: Any,
    out: str | Path,
    *,
    images: Optional[str | Path] = None,
    neurons: Optional[str | Path] = None,
    to: str = "native",
    onnx: bool = False,
    formats: Sequence[str] = (),
    fp16: bool = False,
    check: bool = True,
    check_images: Optional[str | Path] = None,
    tolerance: float = FP32_TOLERANCE,
    overwrite: bool = False,
    discovery: Optional[DiscoveryConfig] = None,
    num_registers: Optional[int] = None,
    scale: Optional[float] = None,
    mode: Optional[str] = None,
    options: Optional[LoadOptions] = None,
    progress: bool = False,
) -> ConvertResult:
    """`vit-surgery convert`: bake test-time registers and write a checked, standalone folder at `out`.

    `neurons`: a neurons.json path or a published set name; `images`: find the neurons first; neither:
    the published set when the model is recognised. `to="timm"` re-expresses open_clip / HF CLIP and HF
    DINOv2 models as timm. `formats=("onnx", "openvino", ...)` also writes and validates those export
    formats (the registry in exporters/formats.py) before `out` is moved into place; `onnx=True` is
    `formats=("onnx",)`.
    """
    if neurons is not None and images is not None:
        raise ModelInputError("convert takes neurons= or images=, not both")
    if to not in ("native", "timm"):
        raise ModelInputError(f"to= must be 'native' or 'timm', not {to!r}")
    opts = options or LoadOptions()
    after = export_formats_hook((["onnx"] if onnx else []) + list(formats), fp16=fp16, progress=progress, options=opts)
    with _as_loaded(model_or_spec, opts) as loaded:
        if to == "timm":
            from .to_timm import to_timm

            loaded = to_timm(loaded)
        return run_convert(loaded, out, neurons=None if neurons is None else str(neurons), images=images,
                           discovery=discovery, overrides={"num_registers": num_registers, "scale": scale,
                                                           "mode": mode},
                           check=check, check_images=check_images, tolerance=tolerance, overwrite=overwrite,
                           options=opts, progress=progress, after_write=after)


def load(out: str | Path, *, device: str = "cpu") -> nn.Module:
    """A folder written by `convert`, as its own library's model (eval mode): a timm `VisionTransformer`,
    an open_clip `CLIP` (use `surgery.open_clip_load` for its preprocess too) or a transformers model.
    Built from the stock class with the recipe baked in; no remote code runs."""
    loaded = load_model(str(out), LoadOptions(device=device))
    if loaded.recipe is None:
        raise ModelInputError(f"{out} carries no baked test-time registers (not a vit-surgery output)")
    return loaded.extra.get("clip", loaded.model).eval()
