"""Loading HF vision-language models (LLaVA family) and vit-surgery's baked VLM folders.

Recognised by config.json `model_type` (`llava`, `llava_next`, `llava_onevision`, `paligemma`). Refused in one line, before anything is built: a
tower vit-surgery does not bake (supported: CLIP and SigLIP vision towers), a
`vision_feature_select_strategy` other than `default` / `full`, a feature layer outside the tower,
and a checkpoint without its image processor (discovery and the check preprocess images exactly as
the VLM does, so there is no fallback).

A stock VLM is loaded with transformers' own `from_pretrained` (float32; the output is written in the
dtype the checkpoint records). A folder written by vit-surgery (config.json `vit_surgery` block) is
loaded without remote code: the stock VLM is built from its config, the recipe is baked into the
tower and the weights are loaded strictly.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from torch import nn

from ...core.errors import ModelInputError, UnsafeCheckpointError, first_line
from ...core.source import LoadedModel, LoadOptions, SourceInfo
from ..base import adapter_among, extra_files
from .adapter import PREPROCESS_ATTR
from .loader import (SURGERY_CONFIG_KEY, _json_preprocess, _quiet_transformers, _resolve, _Source, _stored_dtype,
                     check_processor_values, image_processor_config, load_stock_class, preprocess_from_processor,
                     stock_config_dict)
from .vlm import IMAGE_PROCESSOR_ATTR, SELECT_STRATEGIES, VLM_ADAPTERS, prepare_vlm

VLM_MODEL_TYPES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                   "llava_onevision": "LlavaOnevisionForConditionalGeneration",
                   "paligemma": "PaliGemmaForConditionalGeneration"}
TOWER_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")
# files a VLM folder carries next to its weights (processor, tokenizer, chat template, generation defaults)
VLM_EXTRA_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja",
                   "generation_config.json")


def is_vlm_config(cfg: dict[str, Any]) -> bool:
    return isinstance(cfg.get("model_type"), str) and cfg["model_type"] in VLM_MODEL_TYPES


def check_config_values(cfg: dict[str, Any], spec: str) -> None:
    """One-line refusals (exit 4) of VLM config values transformers would fail on deep inside (or accept
    and then index out of range): sub-configs that are not objects, an image token outside the vocabulary."""
    for key in ("vision_config", "text_config"):
        if key in cfg and cfg[key] is not None and not isinstance(cfg[key], dict):
            raise ModelInputError(f"{spec}: config.json {key} must be an object, got {type(cfg[key]).__name__}")
    vocab = (cfg.get("text_config") or {}).get("vocab_size")
    for key in ("image_token_id", "image_token_index"):
        v = cfg.get(key)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (isinstance(vocab, int) and v >= vocab):
            raise ModelInputError(f"{spec}: config.json {key} {v!r} is not a token of the "
                                  f"{vocab if isinstance(vocab, int) else '?'}-token vocabulary")


def check_supported(cfg: dict[str, Any], spec: str) -> None:
    """One-line refusals for VLMs vit-surgery cannot bake as they are."""
    check_config_values(cfg, spec)
    vision = cfg.get("vision_config") or {}
    tower = vision.get("model_type", "clip_vision_model")  # LlavaConfig's default tower is CLIP
    if tower not in TOWER_MODEL_TYPES:
        raise ModelInputError(f"{spec}: the VLM's vision tower is a {tower!r}; vit-surgery bakes CLIP and SigLIP "
                              f"towers ({', '.join(TOWER_MODEL_TYPES)})")
    if cfg.get("model_type") == "paligemma":  # the tower's last_hidden_state, every token: nothing to select
        return
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in SELECT_STRATEGIES:
        raise ModelInputError(f"{spec}: vision_feature_select_strategy {strategy!r} is not one vit-surgery knows "
                              f"({', '.join(SELECT_STRATEGIES)}): it cannot tell which tower tokens the VLM uses")
    layers = cfg.get("vision_feature_layer", -2)
    depth = int(vision.get("num_hidden_layers", 0) or 0)
    for layer in layers if isinstance(layers, list) else [layers]:
        if not isinstance(layer, int) or (depth and not -depth - 1 <= layer <= depth):
            raise ModelInputError(f"{spec}: vision_feature_layer {layers!r} is not a layer of the "
                                  f"{depth}-layer tower")


def image_processor_of(src: _Source) -> tuple[Any, dict[str, Any]]:
    """The VLM's own image processor (object, raw config); a one-line error when the checkpoint has none."""
    raw = image_processor_config(src)
    if not raw:
        raise ModelInputError(f"{src.spec}: the VLM has no image processor (preprocessor_config.json or "
                              "processor_config.json); vit-surgery preprocesses images exactly as the VLM does")
    from transformers import AutoImageProcessor

    try:
        with _quiet_transformers():
            proc = AutoImageProcessor.from_pretrained(src.target)
    except Exception as e:
        raise ModelInputError(f"{src.spec}: unusable image processor ({first_line(e)})") from None
    return proc, raw


def build_baked_vlm(cfg_dict: dict[str, Any], spec: str) -> tuple[nn.Module, Any, str]:
    """The stock VLM from a vit-surgery VLM config with the recipe baked into its tower (random weights)."""
    import torch
    import transformers

    from ...core.bake import bake_registers
    from ...core.recipe import Recipe

    block = cfg_dict.get(SURGERY_CONFIG_KEY)
    if not isinstance(block, dict) or "recipe" not in block:
        raise ModelInputError(f"{spec}: config.json {SURGERY_CONFIG_KEY!r} block is malformed (no recipe)")
    class_name = block.get("base_class")
    if class_name not in VLM_MODEL_TYPES.values():
        raise ModelInputError(f"{spec}: unsupported base_class {class_name!r} in config.json {SURGERY_CONFIG_KEY}")
    recipe = Recipe.from_dict(block["recipe"], source=f"{spec} config.json")
    cls = getattr(transformers, class_name)
    config = cls.config_class.from_dict(stock_config_dict(cfg_dict, class_name))
    with _quiet_transformers():
        model = cls(config).to(torch.float32).eval()
    fam = adapter_among(VLM_ADAPTERS, model)
    prepare_vlm(model, fam)
    bake_registers(model, recipe, adapter=fam)
    return model, recipe, class_name


def _load_baked(src: _Source, cfg: dict[str, Any], opts: LoadOptions) -> tuple[nn.Module, Any, str, dict[str, Any]]:
    from ...core.weights import load_safetensors_streamed

    model, recipe, class_name = build_baked_vlm(cfg, src.spec)
    weights = src.file("model.safetensors")
    if weights is None:
        raise ModelInputError(f"{src.spec}: no model.safetensors (a vit-surgery VLM folder keeps its weights there)")
    try:
        load_safetensors_streamed(model, weights, map_file=opts.convert_check)
    except RuntimeError as e:
        raise ModelInputError(f"{src.spec}: weights do not match the baked model: {' '.join(str(e).split())[:300]}") from None
    except Exception as e:
        raise ModelInputError(f"{src.spec}: unreadable model.safetensors ({first_line(e)})") from None
    doc: dict[str, Any] = {}
    sj = src.file("surgery.json")
    if sj is not None:
        try:
            doc = json.loads(sj.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            doc = {}
    return model, recipe, class_name, doc.get("source") or cfg[SURGERY_CONFIG_KEY].get("source") or {}


def vlm_extra_files(src: _Source) -> dict[str, str]:
    found = extra_files(src.file)
    for name in VLM_EXTRA_FILES:
        p = src.file(name)
        if p is not None:
            found[name] = str(p)
    return found


def vlm_loader(spec: str, opts: LoadOptions) -> Optional[LoadedModel]:
    src = _resolve(spec)
    if src is None:
        return None
    cfg = src.config()
    if not is_vlm_config(cfg):
        return None
    check_supported(cfg, spec)
    if cfg.get("auto_map") and SURGERY_CONFIG_KEY not in cfg and not opts.trust_remote_code:
        raise UnsafeCheckpointError(f"{spec}: the model's code lives in the model folder (config.json auto_map); "
                                    "pass {trust_remote_code} if you trust it", parameters=("trust_remote_code",))
    image_processor, raw = image_processor_of(src)
    recipe = None
    if SURGERY_CONFIG_KEY in cfg:
        model, recipe, class_name, source_doc = _load_baked(src, cfg, opts)
        fam = adapter_among(VLM_ADAPTERS, model)
    else:
        class_name = VLM_MODEL_TYPES[cfg["model_type"]]
        model = load_stock_class(src, class_name, opts).eval()
        try:
            fam = adapter_among(VLM_ADAPTERS, model)
        except ModelInputError:
            raise ModelInputError(f"{spec}: a {class_name} with a {type(model.model.vision_tower).__name__} tower "
                                  "is not one vit-surgery bakes") from None
        prepare_vlm(model, fam)
        source_doc = {}
    tower_pre = fam.tower_family.preprocess_config(model.model.vision_tower)  # type: ignore[attr-defined]
    check_processor_values(raw, tuple(tower_pre["input_size"][1:]))
    pre = preprocess_from_processor(raw, tower_pre)
    pre = {k: (tuple(v) if isinstance(v, list) else v) for k, v in pre.items()}
    setattr(model, PREPROCESS_ATTR, pre)
    setattr(model, IMAGE_PROCESSOR_ATTR, image_processor)
    if source_doc:
        source = SourceInfo.from_dict(source_doc, "hf")
    else:
        source = SourceInfo("hf", hf_class=class_name, model_type=cfg.get("model_type"), name_or_path=src.target,
                            spec=spec, preprocess=_json_preprocess(pre), dtype=_stored_dtype(cfg))
    return LoadedModel(model, fam, spec, source, fam.data_transform(model), recipe,
                       extra={"preprocessor_config": raw, "baked_folder": recipe is not None, "vlm": True,
                              "extra_files": vlm_extra_files(src)})
