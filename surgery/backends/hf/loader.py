"""Loading HF transformers vision models: `hf:ORG/NAME` hub ids and local HF folders.

Stock models go through transformers' own `from_pretrained` (safetensors preferred; a pickled
`pytorch_model.bin` only with weights_only semantics unless --allow-unsafe-pickle; remote code only with
--trust-remote-code). Folders written by vit-surgery's HF exporter (config.json with a `vit_surgery`
block and an `auto_map` to their modeling file) need remote code for `AutoModel`, but are loaded here
without it: the stock model is built from the config, the recipe is baked into its structure and the
weights are loaded strictly.

The image transform comes from preprocessor_config.json when the model has one, else from the config
(image_size, the family's mean/std).
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ...core.errors import ModelInputError, UnsafeCheckpointError, first_line
from ...core.memory import require_config_fits, require_extras_fit
from ...core.output_format import SURGERY_FILE, read_surgery_json
from ...core.source import LoadedModel, LoadOptions, SourceInfo
from ..base import adapter_among, extra_files, needs_full_unpickling, unsafe_pickle_error
from . import adapter as clip_dinov2_families, dinov3_siglip as dinov3_siglip_families  # noqa: F401 (registering)
from .adapter import PREPROCESS_ATTR
from .family import vision_families
from .stock_refusal import without_stock_refusal

# The tables below come from the HF vision family records (family.py), registered by the modules imported
# above (a new family module is one more import there), in registration = dispatch order.
ADAPTERS = tuple(adapter for family in vision_families() for adapter in family.adapters)
# model_type -> stock class loaded for it (CLIPModel stays whole; its vision tower is what we edit).
HF_MODEL_TYPES = {mt: cls for family in vision_families() for mt, cls in family.model_types.items()}
# architectures[] entries that pick another stock class than the model_type default.
HF_ARCH_CLASSES = {cls: cls for family in vision_families() for cls in family.arch_classes}
SUPPORTED_CLASSES = {cls for family in vision_families() for cls in family.stock_classes}
SURGERY_CONFIG_KEY = "vit_surgery"  # the block our HF exporter writes into config.json
# config.json's `attn_implementation` in folders of older vit-surgery versions (their refusal marker,
# which an explicit attn_implementation= overrode; stock_refusal.py replaced it): taken out when read
LEGACY_REFUSAL_ATTN = "vit_surgery_needs_trust_remote_code"


def stock_config_dict(cfg_dict: dict[str, Any], class_name: str) -> dict[str, Any]:
    """A baked folder's config.json as the stock `class_name`'s config builds it: without the remote-code
    keys and the stock-refusal marker."""
    clean = {k: v for k, v in without_stock_refusal(cfg_dict).items() if k not in ("auto_map", SURGERY_CONFIG_KEY)}
    if clean.get("attn_implementation") == LEGACY_REFUSAL_ATTN:
        del clean["attn_implementation"]
    clean["architectures"] = [class_name]
    return clean

_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}


# ---- resolving files ---------------------------------------------------------------------------

class HFSource:
    """A local folder or a hub id; `file(name)` gives a local path (from the HF cache for hub ids) or None."""

    def __init__(self, spec: str, target: str, local: Optional[Path]) -> None:
        self.spec, self.target, self.local = spec, target, local

    def file(self, name: str) -> Optional[Path]:
        if self.local is not None:
            p = self.local / name
            return p if p.is_file() else None
        from transformers.utils.hub import cached_file

        try:
            got = cached_file(self.target, name, _raise_exceptions_for_missing_entries=False,
                              _raise_exceptions_for_connection_errors=False)
        except Exception:  # offline with no cache entry, gated repo, ...: treated as absent
            return None
        return Path(got) if got else None

    def config(self) -> dict[str, Any]:
        path = self.file("config.json")
        if path is None:
            where = f"folder {self.local}" if self.local is not None else f"hub id {self.target!r}"
            hint = "" if self.local is not None else (
                " (with no network it must be in the HF cache: HF_HUB_CACHE / HF_HUB_OFFLINE=1)")
            raise ModelInputError(f"{self.spec}: no config.json for {where}{hint}")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ModelInputError(f"{self.spec}: unreadable config.json ({first_line(e) or 'nested too deeply'})") from None
        if not isinstance(cfg, dict):
            raise ModelInputError(f"{self.spec}: config.json is not a JSON object")
        require_config_fits(self.spec, cfg)  # absurd depth / image size: refused before anything is built
        require_extras_fit(self.spec, cfg)  # classifier head, LLaVA-NeXT tiles
        return cfg


def resolve_hf_source(spec: str) -> Optional[HFSource]:
    if spec.startswith("hf:"):
        target = spec[3:]
        if not target:
            raise ModelInputError("hf: needs a hub id (hf:ORG/NAME) or a folder (hf:PATH)")
        p = Path(target)
        if p.is_dir():
            return HFSource(spec, target, p)
        if p.exists() or target.startswith((".", "/")) or target.count("/") > 1:
            raise ModelInputError(f"{spec}: not a model folder and not a hub id ORG/NAME")
        return HFSource(spec, target, None)
    p = Path(spec)
    if p.is_dir() and (p / "config.json").is_file():
        try:
            cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None  # the timm loader reports unreadable configs
        if isinstance(cfg, dict) and "model_type" in cfg and "architecture" not in cfg:
            return HFSource(spec, str(p), p)
    return None


# ---- preprocessing -----------------------------------------------------------------------------

def _pair(v: Any) -> Optional[tuple[int, int]]:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, dict):
        if "height" in v and "width" in v:
            return (int(v["height"]), int(v["width"]))
        if "shortest_edge" in v:
            return (int(v["shortest_edge"]), int(v["shortest_edge"]))
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return (int(v[0]), int(v[1]))
    return None


def _positive_ints(value: Any) -> bool:
    values = list(value.values()) if isinstance(value, dict) else [value]
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values) and bool(values)


def check_processor_values(proc: dict[str, Any], tower_size: Optional[tuple[int, int]] = None) -> None:
    """One-line refusals (exit 4) of image-processor values no preprocessing could follow: mean / std not 1 or
    3 finite numbers (std never 0), an unknown `resample`, a size or crop that is not positive integers, and
    (`tower_size`: a tower that takes one size only, as a VLM's) a crop other than the tower's."""
    import math

    for key in ("image_mean", "image_std"):
        v = proc.get(key)
        if v is None:
            continue
        seq = v if isinstance(v, list) else [v]
        if len(seq) not in (1, 3) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                             and math.isfinite(x) for x in seq):
            raise ModelInputError(f"image processor: {key} must be 1 or 3 finite numbers, got {v!r}")
        if key == "image_std" and any(x == 0 for x in seq):
            raise ModelInputError(f"image processor: image_std must not be 0, got {v!r}")
    if "resample" in proc and proc["resample"] not in _RESAMPLE:
        raise ModelInputError(f"image processor: resample {proc['resample']!r} is not a PIL resampling filter "
                              f"({', '.join(map(str, _RESAMPLE))})")
    for key in ("size", "crop_size"):
        if proc.get(key) is not None and not _positive_ints(proc[key]):
            raise ModelInputError(f"image processor: {key} must be positive integers, got {proc[key]!r}")
    crop = proc.get("crop_size")
    if tower_size is not None and isinstance(crop, dict) and "height" in crop and "width" in crop \
            and proc.get("do_center_crop", True) and (crop["height"], crop["width"]) != tuple(tower_size):
        raise ModelInputError(f"image processor: crop_size {crop['height']}x{crop['width']} is not the "
                              f"{tower_size[0]}x{tower_size[1]} the vision tower takes")


def preprocess_from_processor(proc: dict[str, Any], fallback: dict[str, Any]) -> dict[str, Any]:
    """timm transform arguments equivalent to an HF image processor config (resize, center crop, normalise)."""
    check_processor_values(proc)
    cfg = dict(fallback)
    if proc.get("do_normalize", True):
        if proc.get("image_mean") is not None:
            cfg["mean"] = tuple(float(x) for x in proc["image_mean"])
        if proc.get("image_std") is not None:
            cfg["std"] = tuple(float(x) for x in proc["image_std"])
    else:
        cfg["mean"], cfg["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    cfg["interpolation"] = _RESAMPLE.get(proc.get("resample", 3), "bicubic")
    size = proc.get("size")
    shortest = isinstance(size, int) or (isinstance(size, dict) and "shortest_edge" in size)
    resize = _pair(size) if proc.get("do_resize", True) else None
    crop = _pair(proc.get("crop_size")) if proc.get("do_center_crop", proc.get("crop_size") is not None) else None
    if crop is not None:
        cfg["input_size"] = (3, crop[0], crop[1])
        cfg["crop_pct"] = (crop[0] / resize[0]) if resize else 1.0
        cfg["crop_mode"] = "center"
    elif resize is not None:
        cfg["input_size"] = (3, resize[0], resize[1])
        cfg["crop_pct"] = 1.0
        cfg["crop_mode"] = "center" if shortest else "squash"
    return cfg


def set_preprocess(model: nn.Module, cfg: dict[str, Any]) -> None:
    adapter = adapter_among(ADAPTERS, model)
    setattr(adapter.vision(model), PREPROCESS_ATTR, cfg)  # type: ignore[attr-defined]


def json_preprocess(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def _read_json(src: HFSource, path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelInputError(f"{src.spec}: unreadable {path.name} ({first_line(e) or 'nested too deeply'})") from None
    return data if isinstance(data, dict) else {}


def image_processor_config(src: HFSource) -> dict[str, Any]:
    """The checkpoint's image-processor config (preprocessor_config.json, or the `image_processor` entry
    of processor_config.json, where transformers 5 writes it); {} when it has none."""
    path = src.file("preprocessor_config.json")
    if path is not None:
        return _read_json(src, path)
    proc_path = src.file("processor_config.json")
    inner = _read_json(src, proc_path).get("image_processor") if proc_path is not None else None
    return dict(inner) if isinstance(inner, dict) else {}


def _attach_transform(model: nn.Module, src: HFSource, stored: Optional[dict[str, Any]] = None) -> tuple[dict, dict]:
    """Sets the model's preprocessing; returns (timm-style cfg, raw preprocessor_config.json or {})."""
    adapter = adapter_among(ADAPTERS, model)
    base = adapter.preprocess_config(model)  # type: ignore[attr-defined]
    raw = image_processor_config(src)
    if raw:
        try:
            cfg = preprocess_from_processor(raw, base)
        except (TypeError, ValueError) as e:  # e.g. a non-numeric image_mean
            raise ModelInputError(f"{src.spec}: unusable image processor config ({first_line(e)})") from None
    elif stored:
        cfg = dict(stored)
    else:
        cfg = base
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()}
    set_preprocess(model, cfg)
    return cfg, raw


# ---- loading -----------------------------------------------------------------------------------

def _stock_class(cfg: dict[str, Any], spec: str) -> str:
    mt = cfg.get("model_type")
    if not isinstance(mt, str):
        raise ModelInputError(f"{spec}: config.json model_type must be a string, got {type(mt).__name__}")
    archs = cfg.get("architectures") or []
    for a in archs if isinstance(archs, list) else []:
        if isinstance(a, str) and a in HF_ARCH_CLASSES:
            return HF_ARCH_CLASSES[a]
    if mt in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[mt]
    if mt and "siglip2" in str(mt):
        raise ModelInputError(
            f"{spec}: HF Siglip2 takes variable-resolution patch sequences (pixel_attention_mask, spatial_shapes), "
            "which vit-surgery does not bake; use the fixed-resolution timm or open_clip SigLIP2 (vit_*_siglip_*)")
    if mt == "siglip":
        raise ModelInputError(f"{spec}: a whole HF SiglipModel; save its vision tower (SiglipVisionModel) and convert "
                              "that, or use the timm / open_clip SigLIP")
    raise ModelInputError(
        f"{spec}: HF model_type {mt!r} is not supported (supported: {', '.join(sorted(HF_MODEL_TYPES))}; "
        "vit-surgery edits CLIP, SigLIP, DINOv2 and DINOv3 vision models)")


def _map_hf_error(spec: str, e: BaseException) -> Exception:
    text = str(e)
    if needs_full_unpickling(e):
        return unsafe_pickle_error(spec)
    if "trust_remote_code" in text:
        return UnsafeCheckpointError(f"{spec}: the model needs its own code from the model folder; "
                                     "pass --trust-remote-code if you trust it")
    if "size mismatch" in text or "mismatched" in text.lower():
        return ModelInputError(f"{spec}: weights do not match the model config: {' '.join(text.split())[:300]}")
    if isinstance(e, OSError) or "offline" in text.lower() or "connect" in text.lower():
        return ModelInputError(f"{spec}: could not get the weights ({first_line(e)}); with no network, use a "
                               "local folder or a populated HF hub cache (HF_HUB_CACHE, HF_HUB_OFFLINE=1)")
    return ModelInputError(f"{spec}: could not load: {first_line(e)}")


def quiet_transformers():
    """Silence transformers' info/warning chatter while loading (our own errors say what went wrong)."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        from transformers.utils import logging as hf_logging

        old = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            hf_logging.set_verbosity(old)
            if bars:
                hf_logging.enable_progress_bar()
    return ctx()


def _load_stock(src: HFSource, cfg: dict[str, Any], opts: LoadOptions) -> tuple[nn.Module, str]:
    class_name = _stock_class(cfg, src.spec)
    return load_stock_class(src, class_name, opts), class_name


def load_stock_class(src: HFSource, class_name: str, opts: LoadOptions) -> nn.Module:
    """transformers' `class_name` from the source in float32; missing or mismatched tensors refused (no
    randomly initialised weights), unused checkpoint tensors warned about."""
    import torch
    import transformers

    cls = getattr(transformers, class_name)
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(src.target, dtype=torch.float32, use_safetensors=None,
                                              weights_only=not opts.allow_unsafe_pickle, output_loading_info=True)
    except Exception as e:
        raise _map_hf_error(src.spec, e) from None
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise ModelInputError(f"{src.spec}: the weights file lacks {len(missing)} tensor(s) the {class_name} needs "
                              f"(e.g. {missing[0]}); refusing to run with randomly initialised weights")
    if info.get("mismatched_keys"):
        raise ModelInputError(f"{src.spec}: weights do not match the model config ({info['mismatched_keys'][0]})")
    unexpected = list(info.get("unexpected_keys") or [])
    if unexpected:
        logging.getLogger("vit-surgery").warning("%s: ignored %d checkpoint tensor(s) that %s does not use (e.g. %s)",
                                                 src.spec, len(unexpected), class_name, unexpected[0])
    return model


def _load_remote(src: HFSource, opts: LoadOptions) -> nn.Module:
    import torch
    from transformers import AutoModel

    try:
        with quiet_transformers():
            return AutoModel.from_pretrained(src.target, trust_remote_code=True, dtype=torch.float32,
                                             weights_only=not opts.allow_unsafe_pickle)
    except Exception as e:
        raise _map_hf_error(src.spec, e) from None


def build_baked_skeleton(cfg_dict: dict[str, Any], spec: str) -> tuple[nn.Module, Any, str]:
    """The stock model from a vit-surgery HF config with the recipe baked into its structure (random weights)."""
    import torch
    import transformers

    from ...core.bake import bake_registers
    from ...core.recipe import Recipe

    block = cfg_dict.get(SURGERY_CONFIG_KEY)
    if not isinstance(block, dict) or "recipe" not in block:
        raise ModelInputError(f"{spec}: config.json {SURGERY_CONFIG_KEY!r} block is malformed (no recipe)")
    class_name = block.get("base_class")
    if class_name not in SUPPORTED_CLASSES:
        raise ModelInputError(f"{spec}: unsupported base_class {class_name!r} in config.json {SURGERY_CONFIG_KEY}")
    recipe = Recipe.from_dict(block["recipe"], source=f"{spec} config.json")
    cls = getattr(transformers, class_name)
    config = cls.config_class.from_dict(stock_config_dict(cfg_dict, class_name))
    setattr(config, SURGERY_CONFIG_KEY, block)
    with quiet_transformers():
        model = cls(config).to(torch.float32)
    model.eval()
    adapter = adapter_among(ADAPTERS, model)
    want_p = block.get("num_prefix_tokens")
    if want_p is not None and int(want_p) != adapter.num_prefix_tokens(model):
        raise ModelInputError(f"{spec}: config says {want_p} prefix token(s) before the registers, the model has "
                              f"{adapter.num_prefix_tokens(model)}")
    bake_registers(model, recipe, adapter=adapter)
    return model, recipe, class_name


def _load_baked(src: HFSource, cfg: dict[str, Any], opts: LoadOptions) -> LoadedModel:
    from ...core.weights import load_safetensors_streamed

    model, recipe, class_name = build_baked_skeleton(cfg, src.spec)
    weights = src.file("model.safetensors")
    if weights is None:
        raise ModelInputError(f"{src.spec}: no model.safetensors (a vit-surgery HF folder keeps its weights there)")
    try:  # tensor by tensor, in the dtype it was written in
        load_safetensors_streamed(model, weights, map_file=opts.convert_check)
    except RuntimeError as e:
        raise ModelInputError(f"{src.spec}: weights do not match the baked model: {' '.join(str(e).split())[:300]}") from None
    except Exception as e:
        raise ModelInputError(f"{src.spec}: unreadable model.safetensors ({first_line(e)})") from None
    block = cfg[SURGERY_CONFIG_KEY]
    doc: dict[str, Any] = {}
    sj = src.file(SURGERY_FILE)
    if sj is not None:
        try:
            doc = read_surgery_json(sj.parent) or {}
        except ModelInputError:  # the config.json block has what loading needs; `check` reports the damage
            doc = {}
    source = SourceInfo.from_dict(doc.get("source") or block.get("source") or {"class": class_name}, "hf")
    adapter = adapter_among(ADAPTERS, model)
    pre, raw = _attach_transform(model, src, source.preprocess)
    loaded = LoadedModel(model, adapter, src.spec, source, adapter.data_transform(model), recipe,
                         extra={"preprocessor_config": raw, "baked_folder": True, "extra_files": extra_files(src.file)})
    return loaded


def hf_loader(spec: str, opts: LoadOptions) -> Optional[LoadedModel]:
    src = resolve_hf_source(spec)
    if src is None:
        return None
    cfg = src.config()
    if SURGERY_CONFIG_KEY in cfg:
        return _load_baked(src, cfg, opts)
    if cfg.get("auto_map"):
        if not opts.trust_remote_code:
            raise UnsafeCheckpointError(f"{spec}: the model's code lives in the model folder (config.json auto_map); "
                                        "pass {trust_remote_code} if you trust it", parameters=("trust_remote_code",))
        model = _load_remote(src, opts)
        class_name = type(model).__name__
    else:
        if "model_type" not in cfg:
            raise ModelInputError(f"{spec}: config.json has no model_type (not an HF transformers model)")
        model, class_name = _load_stock(src, cfg, opts)
    model.eval()
    adapter = adapter_among(ADAPTERS, model)
    pre, raw = _attach_transform(model, src)
    source = SourceInfo("hf", hf_class=class_name, model_type=cfg.get("model_type"), name_or_path=src.target,
                        spec=spec, preprocess=json_preprocess(pre), dtype=stored_dtype(cfg))
    return LoadedModel(model, adapter, spec, source, adapter.data_transform(model), None,
                       extra={"preprocessor_config": raw, "extra_files": extra_files(src.file)})


def stored_dtype(cfg: dict[str, Any]) -> str:
    """The dtype transformers recorded for the checkpoint (config `dtype` / `torch_dtype`)."""
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")
    return name if name in ("float32", "float16", "bfloat16") else "float32"

