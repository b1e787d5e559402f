"""Loading HF vision-language models (LLaVA family) and vit-surgery's baked VLM folders.

Recognised by config.json `model_type` (`VLM_MODEL_TYPES`: `llava`, `llava_next`, `llava_onevision`, `paligemma`). Refused in one line, before anything is built: a
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
import logging
from typing import Any, Optional

from torch import nn

from ...core.errors import ModelInputError, UnsafeCheckpointError, first_line
from ...core.memory import require_config_fits, text_config_bytes
from ...core.safetensors_io import INDEX_FILE, SINGLE_FILE, ShardedCheckpoint
from ...core.source import LoadedModel, LoadOptions, SourceInfo
from ..base import adapter_among, extra_files
from .adapter import PREPROCESS_ATTR
from .loader import (SURGERY_CONFIG_KEY, json_preprocess, quiet_transformers, resolve_hf_source, HFSource, stored_dtype,
                     check_processor_values, image_processor_config, load_stock_class, preprocess_from_processor,
                     stock_config_dict)
from .family import vlm_families
from .vlm import IMAGE_PROCESSOR_ATTR, SELECT_STRATEGIES, VLM_ADAPTERS, prepare_vlm
from .vlm_stream import build_streamed, move_resident, streamed_checkpoint, unmapped_tensors

# model_type -> the stock VLM class it is loaded as (the VLM family records, family.py / vlm.py)
VLM_MODEL_TYPES = {mt: cls for family in vlm_families() for mt, cls in family.model_types.items()}
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


def image_processor_of(src: HFSource) -> tuple[Any, dict[str, Any]]:
    """The VLM's own image processor (object, raw config); a one-line error when the checkpoint has none."""
    raw = image_processor_config(src)
    if not raw:
        raise ModelInputError(f"{src.spec}: the VLM has no image processor (preprocessor_config.json or "
                              "processor_config.json); vit-surgery preprocesses images exactly as the VLM does")
    from transformers import AutoImageProcessor

    try:
        with quiet_transformers():
            proc = AutoImageProcessor.from_pretrained(src.target)
    except Exception as e:
        raise ModelInputError(f"{src.spec}: unusable image processor ({first_line(e)})") from None
    return proc, raw


def _baked_class(cfg_dict: dict[str, Any], spec: str) -> tuple[type, Any, Any, str]:
    """(stock class, its config, recipe, class name) of a vit-surgery VLM config."""
    import transformers

    from ...core.recipe import Recipe

    block = cfg_dict.get(SURGERY_CONFIG_KEY)
    if not isinstance(block, dict) or "recipe" not in block:
        raise ModelInputError(f"{spec}: config.json {SURGERY_CONFIG_KEY!r} block is malformed (no recipe)")
    class_name = block.get("base_class")
    if class_name not in VLM_MODEL_TYPES.values():
        raise ModelInputError(f"{spec}: unsupported base_class {class_name!r} in config.json {SURGERY_CONFIG_KEY}")
    recipe = Recipe.from_dict(block["recipe"], source=f"{spec} config.json")
    cls = getattr(transformers, class_name)
    return cls, cls.config_class.from_dict(stock_config_dict(cfg_dict, class_name)), recipe, class_name


def _bake_structure(recipe: Any) -> Any:
    """What turns a freshly built stock VLM into the baked one (registers dropped from the tower's outputs)."""
    from ...core.bake import bake_registers

    def bake(model: nn.Module) -> None:
        adapter = adapter_among(VLM_ADAPTERS, model)
        prepare_vlm(model, adapter)
        bake_registers(model, recipe, adapter=adapter)
    return bake


def build_baked_vlm(cfg_dict: dict[str, Any], spec: str) -> tuple[nn.Module, Any, str]:
    """The stock VLM from a vit-surgery VLM config with the recipe baked into its tower (random weights)."""
    import torch

    cls, config, recipe, class_name = _baked_class(cfg_dict, spec)
    with quiet_transformers():
        model = cls(config).to(torch.float32).eval()
    _bake_structure(recipe)(model)
    return model, recipe, class_name


def _stored_float_dtype(files: ShardedCheckpoint) -> Any:
    """The most common floating dtype over the checkpoint's tensors (what a baked folder runs in)."""
    from ...core.source import torch_dtype

    names = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
    counts: dict[str, int] = {}
    for header in files.headers.values():
        for info in header.values():
            if info["dtype"] in names:
                counts[names[info["dtype"]]] = counts.get(names[info["dtype"]], 0) + 1
    return torch_dtype(max(counts, key=counts.get)) if counts else None  # type: ignore[arg-type]


def _load_baked(src: HFSource, cfg: dict[str, Any], opts: LoadOptions) -> tuple[nn.Module, Any, str, dict[str, Any]]:
    """The baked VLM in the dtype it was written in. Written in its source's own dtype, its weights are
    the source's exactly (the bake permutes units): it is judged computing in float32 (block by block)
    against the float64 reference, since half-precision arithmetic on a CPU is slower than float32 and
    says nothing more about the weights; written in another dtype (--dtype), the half judge holds it."""
    import torch

    from ...core.cast import COMPUTE_DTYPE_ATTR

    cls, config, recipe, class_name = _baked_class(cfg, src.spec)
    require_config_fits(src.spec, cfg, streamed=True)
    files = _checkpoint(src)
    if files is None:
        raise ModelInputError(f"{src.spec}: no model.safetensors or {INDEX_FILE} (a vit-surgery VLM folder keeps "
                              "its weights there)")
    doc: dict[str, Any] = {}
    sj = src.file("surgery.json")
    if sj is not None:
        try:
            doc = json.loads(sj.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            doc = {}
    source_doc = doc.get("source") or cfg[SURGERY_CONFIG_KEY].get("source") or {}
    stored = _stored_float_dtype(files)
    same = stored is not None and str(stored).replace("torch.", "") == source_doc.get("dtype", "float32")
    model = build_streamed(cls, config, files, src.spec, dtype=stored, before_load=_bake_structure(recipe))
    if same and stored != torch.float32:
        setattr(model, COMPUTE_DTYPE_ATTR, torch.float32)
    stray = unmapped_tensors(streamed_checkpoint(model))  # type: ignore[arg-type]
    if stray:
        raise ModelInputError(f"{src.spec}: weights do not match the baked model: unexpected tensor {stray[0]} "
                              f"({len(stray)} in all)")
    return model, recipe, class_name, source_doc


def _checkpoint(src: HFSource) -> Optional[ShardedCheckpoint]:
    """The source's safetensors checkpoint (single file or shards + index), or None."""
    try:
        return ShardedCheckpoint.open(src.file)
    except (OSError, ValueError, KeyError) as e:
        raise ModelInputError(f"{src.spec}: unreadable safetensors checkpoint ({first_line(e)})") from None


def load_stock_streamed(src: HFSource, class_name: str, files: ShardedCheckpoint) -> nn.Module:
    """The stock VLM with its tower, projector and image_newline in memory and its language model streamed
    from `files` (surgery/backends/hf/vlm_stream.py); stored tensors it has no name for are warned about and
    copied to the output as they are. A checkpoint stored in half precision stays so in memory (half the
    tower's bytes; baked in place, exactly) and computes in float32 block by block (COMPUTE_DTYPE_ATTR:
    discovery, the judge and the effect statistics cast one block at a time)."""
    import torch
    import transformers

    from ...core.cast import COMPUTE_DTYPE_ATTR

    cls = getattr(transformers, class_name)
    try:
        with quiet_transformers():
            config = cls.config_class.from_pretrained(src.target)
    except Exception as e:
        raise ModelInputError(f"{src.spec}: unusable config.json ({first_line(e)})") from None
    stored = _stored_float_dtype(files)
    half = stored in (torch.float16, torch.bfloat16)
    model = build_streamed(cls, config, files, src.spec, dtype=stored if half else torch.float32)
    if half:
        setattr(model, COMPUTE_DTYPE_ATTR, torch.float32)
    stray = unmapped_tensors(streamed_checkpoint(model))  # type: ignore[arg-type]
    if stray:
        logging.getLogger("vit-surgery").warning("%s: %d stored tensor(s) that %s does not use (e.g. %s) are copied "
                                                 "to the output unchanged", src.spec, len(stray), class_name, stray[0])
    return model


def vlm_extra_files(src: HFSource) -> dict[str, str]:
    found = extra_files(src.file)
    for name in VLM_EXTRA_FILES:
        p = src.file(name)
        if p is not None:
            found[name] = str(p)
    return found


def vlm_loader(spec: str, opts: LoadOptions) -> Optional[LoadedModel]:
    src = resolve_hf_source(spec)
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
        adapter = adapter_among(VLM_ADAPTERS, model)
    else:
        class_name = VLM_MODEL_TYPES[cfg["model_type"]]
        streamed = src.file(INDEX_FILE) is not None or src.file(SINGLE_FILE) is not None
        require_config_fits(spec, cfg, streamed=streamed)  # the whole config, before any file is opened
        files = _checkpoint(src)
        if files is None:  # a pickled checkpoint: the whole VLM is loaded
            model = load_stock_class(src, class_name, opts).eval()
        else:
            model = load_stock_streamed(src, class_name, files)
        try:
            adapter = adapter_among(VLM_ADAPTERS, model)
        except ModelInputError:
            raise ModelInputError(f"{spec}: a {class_name} with a {type(model.model.vision_tower).__name__} tower "
                                  "is not one vit-surgery bakes") from None
        prepare_vlm(model, adapter)
        source_doc = {}
    if streamed_checkpoint(model) is not None:
        move_resident(model, opts.device)
    tower_pre = adapter.tower_adapter.preprocess_config(model.model.vision_tower)  # type: ignore[attr-defined]
    check_processor_values(raw, tuple(tower_pre["input_size"][1:]))
    pre = preprocess_from_processor(raw, tower_pre)
    pre = {k: (tuple(v) if isinstance(v, list) else v) for k, v in pre.items()}
    setattr(model, PREPROCESS_ATTR, pre)
    setattr(model, IMAGE_PROCESSOR_ATTR, image_processor)
    if source_doc:
        source = SourceInfo.from_dict(source_doc, "hf")
    else:
        ckpt = streamed_checkpoint(model)
        stored = _stored_float_dtype(ckpt.files) if ckpt is not None else None
        dtype = str(stored).replace("torch.", "") if stored is not None else stored_dtype(cfg)
        source = SourceInfo("hf", hf_class=class_name, model_type=cfg.get("model_type"), name_or_path=src.target,
                            spec=spec, preprocess=json_preprocess(pre), dtype=dtype)
    return LoadedModel(model, adapter, spec, source, adapter.data_transform(model), recipe,
                       extra={"preprocessor_config": raw, "baked_folder": recipe is not None, "vlm": True,
                              # one language-model unit, read and cast to float32, when the judge runs it
                              "stream_bytes": 2 * text_config_bytes(cfg)[1] if streamed_checkpoint(model) else 0,
                              "extra_files": vlm_extra_files(src)})
