"""Re-expressing other libraries' models as timm models, so `convert --to timm` can emit a timm folder.

open_clip CLIP image towers map onto timm's CLIP ViT (`vit_base_patch16_clip_224` skeleton with the
tower's sizes) through timm's own open_clip checkpoint filter; hidden-unit order is kept, so register
neurons found on the open_clip model apply unchanged. The conversion is checked numerically before
use: the timm model must reproduce `visual(x)` (the image embedding) to fp32 precision.
"""
from __future__ import annotations

import torch

from .errors import ModelInputError
from .families import family_by_name
from .loading import LoadedModel

TIMM_CLIP_SKELETON = "vit_base_patch16_clip_224"


@torch.no_grad()
def open_clip_to_timm(loaded: LoadedModel) -> LoadedModel:
    """The open_clip image tower of `loaded` as a timm VisionTransformer (LoadedModel, library timm)."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    visual = loaded.model
    cfg = dict(loaded.source.get("model_cfg") or {})
    v = dict(cfg.get("vision_cfg") or {})
    unsupported = [k for k in ("attentional_pool", "timm_model_name", "no_ln_pre", "final_ln_after_pool",
                               "output_tokens", "pos_embed_type")
                   if v.get(k) not in (None, False, "learnable")]
    if unsupported or v.get("pool_type", "tok") != "tok" or getattr(visual, "proj", None) is None:
        raise ModelInputError(f"{loaded.spec}: this open_clip image tower has no timm equivalent "
                              f"({', '.join(unsupported) or 'pooling/projection'}); convert it to an open_clip folder")
    width, layers = int(v["width"]), int(v["layers"])
    head_width = int(v.get("head_width", 64))
    image_size, patch_size = v.get("image_size", 224), v.get("patch_size", 16)
    args = {"img_size": image_size if isinstance(image_size, int) else list(image_size),
            "patch_size": patch_size, "embed_dim": width, "depth": layers, "num_heads": width // head_width,
            "mlp_ratio": float(v.get("mlp_ratio", 4.0)), "num_classes": int(visual.proj.shape[1]),
            "global_pool": "token", "pre_norm": True}
    if cfg.get("quick_gelu"):
        args["act_layer"] = "quick_gelu"
    pre = dict(loaded.source.get("preprocess_cfg") or {})
    size = pre.get("size", image_size)
    size = [size, size] if isinstance(size, int) else list(size)
    pretrained_cfg = {"input_size": [3, *size], "mean": list(pre.get("mean", (0.48145466, 0.4578275, 0.40821073))),
                      "std": list(pre.get("std", (0.26862954, 0.26130258, 0.27577711))),
                      "interpolation": pre.get("interpolation", "bicubic"), "crop_pct": 1.0,
                      "num_classes": args["num_classes"]}
    model = timm.create_model(TIMM_CLIP_SKELETON, pretrained=False, pretrained_cfg_overlay=pretrained_cfg, **args)
    state = checkpoint_filter_fn({f"visual.{k}": t for k, t in visual.state_dict().items()}, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelInputError(f"{loaded.spec}: open_clip weights do not map onto timm's CLIP ViT: "
                              f"{str(e).splitlines()[0]}") from None
    model.eval()
    c, h, w = 3, *size
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
    want, got = visual(x), model(x)
    rel = float((got - want).norm(dim=-1).max() / want.norm(dim=-1).min())
    if not rel < 1e-5:
        raise ModelInputError(f"{loaded.spec}: the timm re-expression differs from open_clip (relative {rel:.2g})")
    fam = family_by_name("timm")
    source = {"library": "timm", "architecture": TIMM_CLIP_SKELETON, "model_args": args,
              "pretrained_cfg": dict(pretrained_cfg, architecture=TIMM_CLIP_SKELETON), "converted_from": loaded.spec}
    return LoadedModel(model, fam, loaded.spec, source, fam.data_transform(model), None)


def to_timm(loaded: LoadedModel) -> LoadedModel:
    """`loaded` as a timm model (itself when it already is one)."""
    library = loaded.source.get("library")
    if library == "timm":
        return loaded
    if library == "open_clip":
        return open_clip_to_timm(loaded)
    raise ModelInputError(f"{loaded.spec}: --to timm is available for timm and open_clip CLIP inputs, not {library}")
