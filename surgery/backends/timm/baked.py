"""The baked timm model as a registered timm architecture.

A baked checkpoint's config.json names architecture `vit_surgery_baked` with the source architecture,
its model args and the recipe in `model_args`. After `import surgery`, timm's own
`create_model('local-dir:OUT', pretrained=True)` builds the source skeleton, bakes the structure and
loads the weights strictly. Plain timm (no import) fails with "Unknown model (vit_surgery_baked)"
instead of silently loading an unfixed model.
"""
from __future__ import annotations

from typing import Any

from timm.models import register_model
from torch import nn

from ...core.bake import bake_registers
from ...core.recipe import Recipe
from ..base import adapter_among
from .adapter import TIMM
from .eva import TIMM_EVA

BAKED_ARCH = "vit_surgery_baked"


def _cfg_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return dict(cfg)


# What timm's VisionTransformer and Eva factories give `features_only` models by default: the feature
# getter on forward_intermediates, last 3 blocks (timm/models/vision_transformer.py, eva.py).
SOURCE_FEATURE_CFG = dict(out_indices=3, feature_cls="getter")


def fit_pos_embed(state_dict: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The checkpoint filter timm's factories have (`img_size=` at load): a positional table saved at
    another grid is resampled as timm resamples the source's, with the source's prefix rows (the test-time
    registers have none)."""
    from timm.layers import resample_abs_pos_embed

    table, have = state_dict.get("pos_embed"), getattr(model, "pos_embed", None)
    if table is not None and have is not None and table.shape != have.shape:
        registers = model.surgery_recipe.num_registers  # baked: prefix tokens = the source's + registers
        prefix = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens) - registers
        state_dict["pos_embed"] = resample_abs_pos_embed(table, new_size=model.patch_embed.grid_size,
                                                         num_prefix_tokens=prefix, interpolation="bicubic",
                                                         antialias=True, verbose=False)
    return state_dict


def _as_timm_reads_the_source(cfg: dict[str, Any], source_args: dict[str, Any]) -> dict[str, Any]:
    """The pretrained_cfg as timm's hub reader makes the source's from its config.json (`input_size` a tuple
    sized from the model args): our config.json nests those args under `source_model_args`, where timm's
    reader does not look."""
    try:
        from timm.models._hub import _parse_model_cfg
    except ImportError:  # a timm without that reader: keep the cfg as read
        return cfg
    typed, _, _ = _parse_model_cfg({"pretrained_cfg": dict(cfg), "model_args": dict(source_args),
                                    "architecture": BAKED_ARCH}, {})
    return typed


@register_model
def vit_surgery_baked(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A timm VisionTransformer / Eva with baked test-time registers (see surgery.bake_registers).

    Built by timm's own `build_model_with_cfg`, as timm's factories build their models: the source
    skeleton is created and baked, the weights loaded strictly, and `features_only=True` (any
    `feature_cls`, `out_indices`) wraps the baked model afterwards, never the other way round.
    """
    import timm
    from timm.models import build_model_with_cfg
    from timm.models._builder import resolve_pretrained_cfg

    try:
        source_arch = kwargs.pop("source_architecture")
        recipe = Recipe.from_dict(kwargs.pop("surgery"), source="config.json model_args.surgery")
    except KeyError as e:
        raise RuntimeError(f"{BAKED_ARCH} needs model_args.{e.args[0]} (written by vit-surgery)") from None
    source_args = dict(kwargs.pop("source_model_args", {}) or {})
    cfg = _cfg_dict(kwargs.pop("pretrained_cfg", None))
    cfg.update(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if cfg:
        cfg = _as_timm_reads_the_source(cfg, source_args)
    for k in ("pretrained_model_args", "cache_dir"):
        kwargs.pop(k, None)
    source_args.update(kwargs)
    # Built from exactly what built the source: its resolved pretrained_cfg (head size, input size,
    # labels) and kwargs, never the architecture's default tag.
    source_cfg = dict(cfg, architecture=source_arch) if cfg else None

    def build_baked(**model_args: Any) -> nn.Module:
        model = timm.create_model(source_arch, pretrained=False, pretrained_cfg=source_cfg, **model_args)
        return bake_registers(model, recipe, adapter=adapter_among((TIMM, TIMM_EVA), model))

    if cfg:
        cfg["architecture"] = BAKED_ARCH
    else:  # no config given: the source architecture's own default
        cfg = resolve_pretrained_cfg(source_arch).to_dict()
    return build_model_with_cfg(build_baked, BAKED_ARCH, pretrained, pretrained_cfg=cfg,
                                feature_cfg=dict(SOURCE_FEATURE_CFG), pretrained_strict=True,
                                pretrained_filter_fn=fit_pos_embed, **source_args)
