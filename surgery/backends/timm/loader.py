"""Loading timm models from the names users type: timm names, hf-hub:, local-dir:, folders.

The loader returns a LoadedModel: the module in eval mode, its adapter, the preprocessing transform
from the model's own pretrained config, and a `source` record that the writer writes back (so a baked
checkpoint can rebuild its skeleton). `surgery.backends.load_model` is the one dispatch point.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ...core.errors import ModelInputError, first_line
from ...core.memory import require_config_fits, require_extras_fit
from ...core.source import LoadedModel, LoadOptions, SourceInfo, safetensors_dtype, torch_dtype
from ..base import adapter_among, hub_file, needs_full_unpickling, unsafe_pickle_error
from .adapter import TIMM
from .baked import BAKED_ARCH
from .eva import TIMM_EVA

ADAPTERS = (TIMM, TIMM_EVA)  # timm's VisionTransformer and Eva (DINOv3, EVA02, PE-Core)


def _map_timm_error(spec: str, e: BaseException) -> Exception:
    msg = first_line(e)
    if needs_full_unpickling(e):
        return unsafe_pickle_error(spec)
    if "Unknown model" in msg:
        return ModelInputError(f"unknown model {spec!r}: not a timm model name, hf-hub:ORG/NAME, local-dir:PATH "
                               "or a folder with config.json + model.safetensors")
    if "size mismatch" in str(e) or "Missing key" in str(e) or "Unexpected key" in str(e):
        detail = " ".join(str(e).split())[:300]
        return ModelInputError(f"{spec}: weights do not match the model config: {detail}")
    if "No suitable checkpoints" in msg:
        return ModelInputError(f"{spec}: no weights file (model.safetensors, pytorch_model.bin, ...) in the folder")
    if isinstance(e, (OSError, ConnectionError)) or "offline" in msg.lower() or "hub" in msg.lower():
        return ModelInputError(f"{spec}: could not get the pretrained weights ({msg}); with no network, use a "
                               "local folder or a populated HF hub cache (HF_HUB_CACHE)")
    return ModelInputError(f"{spec}: could not load: {msg}")


def timm_build_args(model: nn.Module, declared: dict[str, Any] | None = None) -> dict[str, Any]:
    """The kwargs that rebuild `model`'s class exactly: what the factory recorded (model_args from the
    config, create_model kwargs) plus the current head/pool/size/channels, as timm's own exporter
    (`save_for_hf`) computes them. JSON-only; non-serialisable values are dropped."""
    try:
        from timm.models._input import get_model_args

        args = dict(get_model_args(model))
    except Exception:  # older timm: what the config declared, plus the head
        args = dict(getattr(model, "_model_args", {}) or {})
        args.setdefault("num_classes", int(getattr(model, "num_classes", 0)))
    for k, v in (declared or {}).items():
        args.setdefault(k, v)
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "pretrained_model_args", "cache_dir", "device", "dtype"):
        args.pop(k, None)
    opaque = sorted(k for k, v in args.items() if not _is_json(v))
    if opaque:  # the output could not be rebuilt from its config.json: refuse rather than build another class
        raise ModelInputError(f"the timm model was built with argument(s) {', '.join(opaque)} that are not plain "
                              "values (e.g. a Python class), so its output could not be rebuilt from config.json; "
                              "pass them by name (e.g. act_layer='gelu')")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in args.items()}


def timm_source(model: nn.Module, arch: str, model_args: dict[str, Any]) -> SourceInfo:
    """What built `model`: its architecture, the kwargs and its resolved pretrained_cfg (labels included)."""
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    for k in ("file", "source", "state_dict", "url", "hf_hub_id", "hf_hub_filename"):
        cfg.pop(k, None)
    cfg["architecture"] = arch
    return SourceInfo("timm", architecture=arch, model_args=timm_build_args(model, model_args),
                      pretrained_cfg=_jsonable(cfg))


def _is_json(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if _is_json(v)}


def _load_timm_folder(spec: str, path: Path, opts: LoadOptions) -> LoadedModel:
    import timm


    cfg_file = path / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelInputError(f"{spec}: unreadable config.json ({first_line(e) or 'nested too deeply'})") from None
    if not isinstance(cfg, dict) or "architecture" not in cfg:
        raise ModelInputError(f"{spec}: config.json has no 'architecture' (not a timm model folder)")
    require_config_fits(spec, cfg)  # a depth or img_size of 100000 is refused before anything is built
    require_extras_fit(spec, cfg)  # a classifier head of 30 million classes likewise
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt")]
    if not weights:
        raise ModelInputError(f"{spec}: no weights file (model.safetensors or pytorch_model.bin) in {path}")
    try:
        model = _create_timm_from_folder(path, cfg, opts.convert_check)
    except Exception as e:  # timm raises RuntimeError/AssertionError/OSError for all of these
        if needs_full_unpickling(e):
            if not opts.allow_unsafe_pickle:
                raise _map_timm_error(spec, e) from None
            model = _load_unsafe(path)
        elif "Unknown model" in first_line(e):
            raise ModelInputError(f"{spec}: config.json names architecture {cfg['architecture']!r}, which timm "
                                  f"{timm.__version__} does not know") from None
        else:
            raise _map_timm_error(spec, e) from None
    arch = cfg["architecture"]
    args = dict(cfg.get("model_args", {}) or {})
    recipe = getattr(model, "surgery_recipe", None)
    if arch == BAKED_ARCH:
        source = SourceInfo("timm", architecture=args.get("source_architecture"),
                            model_args=args.get("source_model_args", {}),
                            pretrained_cfg=_jsonable(dict(cfg.get("pretrained_cfg", {}))))
        source.pretrained_cfg["architecture"] = source.architecture
    else:
        source = timm_source(model, arch, args)
    stored = safetensors_dtype(next((p for p in sorted(path.iterdir()) if p.suffix == ".safetensors"), None))
    source.dtype = stored or "float32"
    if recipe is not None:  # a baked folder runs in the dtype it was written in
        model.to(torch_dtype(stored))
    fam = adapter_among(ADAPTERS, model)
    return LoadedModel(model, fam, spec, source, fam.data_transform(model), recipe)


def _create_timm_from_folder(path: Path, cfg: dict, map_file: bool = False) -> nn.Module:
    """timm's local-dir loading; a vit-surgery folder's weights are read tensor by tensor
    (surgery/core/weights.py) so a reload during convert costs one model, not two."""
    import timm


    weights = path / "model.safetensors"
    if cfg.get("architecture") != BAKED_ARCH or not weights.is_file():
        return timm.create_model(f"local-dir:{path}", pretrained=True)
    from ...core.weights import load_safetensors_streamed, skip_weight_init

    with skip_weight_init():  # every stored tensor is overwritten below (strictly)
        model = timm.create_model(f"local-dir:{path}", pretrained=False)
    load_safetensors_streamed(model, weights, map_file=map_file)
    return model


def _load_unsafe(path: Path) -> nn.Module:
    """Only with --allow-unsafe-pickle: build from config.json and fully unpickle the weights."""
    import timm
    import torch

    model = timm.create_model(f"local-dir:{path}", pretrained=False)
    f = next(p for p in sorted(path.iterdir()) if p.suffix in (".bin", ".pth", ".pt"))
    sd = torch.load(f, map_location="cpu", weights_only=False)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    model.load_state_dict(sd, strict=True)
    return model


def timm_loader(spec: str, opts: LoadOptions) -> Optional[LoadedModel]:
    import timm

    if spec.startswith("local-dir:"):
        path = Path(spec[len("local-dir:"):])
        if not path.is_dir():
            raise ModelInputError(f"model folder not found: {path}")
        return _load_timm_folder(spec, path, opts)
    path = Path(spec)
    if path.exists():
        if path.is_dir() and (path / "config.json").is_file():
            try:
                cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ModelInputError(f"{spec}: unreadable config.json ({first_line(e)})") from None
            if isinstance(cfg, dict) and "architecture" in cfg:
                return _load_timm_folder(spec, path, opts)
            return None  # another library's folder (HF transformers config has model_type)
        if path.is_dir():
            raise ModelInputError(f"{spec}: folder has no config.json (expected a timm, HF or vit-surgery model folder)")
        return None
    if ":" in spec and not spec.startswith("hf-hub:"):
        return None  # another library's prefix (open_clip:, hf:)
    if "/" in spec and not spec.startswith("hf-hub:"):
        raise ModelInputError(f"model folder not found: {spec}")
    try:
        model = timm.create_model(spec, pretrained=True)
    except Exception as e:
        raise _map_timm_error(spec, e) from None
    arch = model.pretrained_cfg.get("architecture") or spec.split(":")[-1].split(".")[0]
    source = timm_source(model, arch, {})
    source.spec = spec
    if spec.startswith("hf-hub:"):
        repo = spec[len("hf-hub:"):].split("@")[0]
        source.dtype = safetensors_dtype(hub_file(repo, "model.safetensors")) or "float32"
    fam = adapter_among(ADAPTERS, model)
    return LoadedModel(model, fam, spec, source, fam.data_transform(model), getattr(model, "surgery_recipe", None))

