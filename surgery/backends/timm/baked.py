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


@register_model
def vit_surgery_baked(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A timm VisionTransformer with baked test-time registers (see surgery.bake_registers)."""
    import timm
    from timm.models import load_pretrained

    try:
        source_arch = kwargs.pop("source_architecture")
        recipe = Recipe.from_dict(kwargs.pop("surgery"), source="config.json model_args.surgery")
    except KeyError as e:
        raise RuntimeError(f"{BAKED_ARCH} needs model_args.{e.args[0]} (written by vit-surgery)") from None
    source_args = dict(kwargs.pop("source_model_args", {}) or {})
    cfg = _cfg_dict(kwargs.pop("pretrained_cfg", None))
    cfg.update(kwargs.pop("pretrained_cfg_overlay", None) or {})
    for k in ("pretrained_model_args", "cache_dir"):
        kwargs.pop(k, None)
    source_args.update(kwargs)
    # Built from exactly what built the source: its resolved pretrained_cfg (head size, input size,
    # labels) and kwargs, never the architecture's default tag.
    source_cfg = dict(cfg, architecture=source_arch) if cfg else None
    model = timm.create_model(source_arch, pretrained=False, pretrained_cfg=source_cfg, **source_args)
    bake_registers(model, recipe, adapter=adapter_among((TIMM, TIMM_EVA), model))
    if cfg:
        cfg["architecture"] = BAKED_ARCH
        model.pretrained_cfg = model.default_cfg = cfg
    if pretrained:
        load_pretrained(model, pretrained_cfg=cfg, num_classes=model.num_classes, strict=True)
    return model
