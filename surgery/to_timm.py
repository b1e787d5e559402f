"""Re-expressing other libraries' models as timm models, so `convert --to timm` can emit a timm folder.

open_clip towers on timm trunks (SigLIP, EVA02, PE-Core) are their trunk, rebuilt by timm; open_clip CLIP image towers map onto timm's CLIP ViT (`vit_base_patch16_clip_224` skeleton with the
tower's sizes) through timm's own open_clip checkpoint filter, HF CLIP vision towers and HF DINOv2
backbones (LayerScale, SwiGLU, trained registers) through the key mappings below; hidden-unit order is kept, so register neurons found on the source apply unchanged. The conversion is checked numerically before
use: the timm model must reproduce `visual(x)` (the image embedding) to fp32 precision.
"""
from __future__ import annotations

from typing import Any

import torch

from .core.errors import ModelInputError
from .backends import adapter_for
from .core.source import LoadedModel, SourceInfo

TIMM_CLIP_SKELETON = "vit_base_patch16_clip_224"


@torch.no_grad()
def open_clip_to_timm(loaded: LoadedModel) -> LoadedModel:
    """The open_clip image tower of `loaded` as a timm VisionTransformer (LoadedModel, library timm)."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    visual = loaded.model
    cfg = dict(loaded.source.model_cfg or {})
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
    pre = dict(loaded.source.preprocess_cfg or {})
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
    return _checked(loaded, model, args, pretrained_cfg, visual)


@torch.no_grad()
def hf_clip_to_timm(loaded: LoadedModel) -> LoadedModel:
    """An HF CLIP vision tower (with its visual projection when the model has one) as timm's CLIP ViT."""
    import timm

    fam = loaded.adapter
    vt = fam.vision(loaded.model)
    cfg = vt.config
    D, L = int(cfg.hidden_size), int(cfg.num_hidden_layers)
    proj = getattr(loaded.model, "visual_projection", None)
    args = {"img_size": int(cfg.image_size), "patch_size": int(cfg.patch_size), "embed_dim": D, "depth": L,
            "num_heads": int(cfg.num_attention_heads), "mlp_ratio": cfg.intermediate_size / D,
            "num_classes": int(proj.weight.shape[0]) if proj is not None else 0, "global_pool": "token",
            "pre_norm": True}
    act = getattr(cfg, "hidden_act", "quick_gelu")
    if act == "quick_gelu":
        args["act_layer"] = "quick_gelu"
    elif act not in ("gelu",):
        raise ModelInputError(f"{loaded.spec}: HF CLIP activation {act!r} has no timm equivalent")
    pre = fam.preprocess_config(loaded.model)  # the source's own preprocessing travels with it
    pretrained_cfg = {"input_size": list(pre["input_size"]), "mean": list(pre["mean"]), "std": list(pre["std"]),
                      "interpolation": pre.get("interpolation", "bicubic"), "crop_pct": pre.get("crop_pct", 1.0),
                      "crop_mode": pre.get("crop_mode", "center"), "num_classes": args["num_classes"]}
    model = timm.create_model(TIMM_CLIP_SKELETON, pretrained=False, pretrained_cfg_overlay=pretrained_cfg, **args)
    emb = vt.embeddings
    sd = {"cls_token": emb.class_embedding.reshape(1, 1, D), "pos_embed": emb.position_embedding.weight[None],
          "patch_embed.proj.weight": emb.patch_embedding.weight,
          "norm_pre.weight": vt.pre_layrnorm.weight, "norm_pre.bias": vt.pre_layrnorm.bias,
          "norm.weight": vt.post_layernorm.weight, "norm.bias": vt.post_layernorm.bias}
    for i, layer in enumerate(vt.encoder.layers):
        a, pre = layer.self_attn, f"blocks.{i}."
        sd[pre + "attn.qkv.weight"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        sd[pre + "attn.qkv.bias"] = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        for ours, theirs in (("attn.proj", a.out_proj), ("norm1", layer.layer_norm1), ("norm2", layer.layer_norm2),
                             ("mlp.fc1", layer.mlp.fc1), ("mlp.fc2", layer.mlp.fc2)):
            sd[pre + ours + ".weight"], sd[pre + ours + ".bias"] = theirs.weight, theirs.bias
    if proj is not None:
        sd["head.weight"], sd["head.bias"] = proj.weight, torch.zeros(proj.weight.shape[0])
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ModelInputError(f"{loaded.spec}: HF CLIP weights do not map onto timm's CLIP ViT: "
                              f"{str(e).splitlines()[0]}") from None
    return _checked(loaded, model, args, pretrained_cfg, lambda x: fam.forward_pooled(loaded.model, x))


def _trunk_args(loaded: LoadedModel, trunk) -> tuple[str, dict]:
    """timm architecture and create_model arguments that rebuild open_clip's trunk: the arguments open_clip
    passes (classifier size, pooling) over the model_args of a `local-dir:` trunk config, if any."""
    import json
    from pathlib import Path

    name = str(dict((loaded.source.model_cfg or {}).get("vision_cfg") or {}).get("timm_model_name", ""))
    args: dict = {}
    if name.startswith("local-dir:"):
        cfg_file = Path(name[len("local-dir:"):]) / "config.json"
        if not cfg_file.is_file():
            raise ModelInputError(f"{loaded.spec}: the trunk's timm config {cfg_file} is gone; cannot rebuild the trunk")
        args.update(json.loads(cfg_file.read_text()).get("model_args") or {})
    arch = str(trunk.pretrained_cfg.get("architecture") or name)
    args.update(num_classes=int(trunk.num_classes), global_pool=str(trunk.global_pool))
    return arch, args


@torch.no_grad()
def open_clip_timm_trunk_to_timm(loaded: LoadedModel) -> LoadedModel:
    """An open_clip tower on a timm trunk (SigLIP, EVA02, PE-Core): the trunk itself, when open_clip adds
    no head of its own (`visual(x)` = `trunk(x)`), rebuilt by timm from its architecture and arguments."""
    import timm

    visual = loaded.model
    trunk = visual.trunk
    if len(list(visual.head.children())):
        raise ModelInputError(f"{loaded.spec}: this open_clip tower adds its own head ({', '.join(n for n, _ in visual.head.named_children())}) "
                              "on the timm trunk, which a timm folder cannot hold; convert it to an open_clip folder")
    arch, args = _trunk_args(loaded, trunk)
    pre = dict(loaded.source.preprocess_cfg or {})
    size = pre.get("size", tuple(visual.image_size))
    size = [size, size] if isinstance(size, int) else list(size)
    pretrained_cfg = {"input_size": [3, *size], "mean": list(pre.get("mean", trunk.pretrained_cfg.get("mean"))),
                      "std": list(pre.get("std", trunk.pretrained_cfg.get("std"))),
                      "interpolation": pre.get("interpolation", "bicubic"), "crop_pct": 1.0,
                      "num_classes": args["num_classes"]}
    model = timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=pretrained_cfg, **args)
    try:
        model.load_state_dict(trunk.state_dict(), strict=True)
    except RuntimeError as e:
        raise ModelInputError(f"{loaded.spec}: the open_clip trunk does not rebuild as timm {arch}: "
                              f"{' '.join(str(e).split())[:200]}") from None
    return _checked(loaded, model, args, pretrained_cfg, visual, arch)


def _first(obj, *paths: str):
    """The first attribute path that exists (transformers renamed modules across releases)."""
    for path in paths:
        cur = obj
        for part in path.split("."):
            cur = getattr(cur, part, None)
            if cur is None:
                break
        if cur is not None:
            return cur
    raise ModelInputError(f"unexpected HF module layout: none of {paths} on {type(obj).__name__}")


@torch.no_grad()
def _hf_dinov2_block_state(layer: Any, pre_: str, swiglu: bool) -> dict[str, torch.Tensor]:
    """One HF DINOv2 layer's tensors under timm's block names (`pre_` = "blocks.i."): fused qkv,
    LayerScale gammas, the MLP ([gate; up] packed into fc1 for SwiGLU)."""
    sd: dict[str, torch.Tensor] = {}
    a = layer.attention
    q = _first(a, "q_proj", "attention.query")
    k = _first(a, "k_proj", "attention.key")
    v = _first(a, "v_proj", "attention.value")
    o = _first(a, "o_proj", "output.dense")
    sd[pre_ + "attn.qkv.weight"] = torch.cat([q.weight, k.weight, v.weight])
    sd[pre_ + "attn.qkv.bias"] = torch.cat([q.bias, k.bias, v.bias])
    sd[pre_ + "attn.proj.weight"], sd[pre_ + "attn.proj.bias"] = o.weight, o.bias
    for ours, theirs in (("norm1", layer.norm1), ("norm2", layer.norm2)):
        sd[pre_ + ours + ".weight"], sd[pre_ + ours + ".bias"] = theirs.weight, theirs.bias
    sd[pre_ + "ls1.gamma"] = layer.layer_scale1.lambda1
    sd[pre_ + "ls2.gamma"] = layer.layer_scale2.lambda1
    mlp = layer.mlp
    if swiglu:
        if hasattr(mlp, "gate_proj"):
            w = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            b = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])
        else:  # packed weights_in: [gate; up]
            w, b = mlp.weights_in.weight, mlp.weights_in.bias
        d = _first(mlp, "down_proj", "weights_out")
        sd[pre_ + "mlp.fc1.weight"], sd[pre_ + "mlp.fc1.bias"] = w, b
        sd[pre_ + "mlp.fc2.weight"], sd[pre_ + "mlp.fc2.bias"] = d.weight, d.bias
    else:
        sd[pre_ + "mlp.fc1.weight"], sd[pre_ + "mlp.fc1.bias"] = mlp.fc1.weight, mlp.fc1.bias
        sd[pre_ + "mlp.fc2.weight"], sd[pre_ + "mlp.fc2.bias"] = mlp.fc2.weight, mlp.fc2.bias
    return sd


def hf_dinov2_to_timm(loaded: LoadedModel) -> LoadedModel:
    """An HF `Dinov2Model` / `Dinov2WithRegistersModel` as timm's DINOv2 ViT (LayerScale, SwiGLU, registers)."""
    import timm

    m = loaded.model
    cfg = m.config
    D, L = int(cfg.hidden_size), int(cfg.num_hidden_layers)
    regs = int(getattr(cfg, "num_register_tokens", 0) or 0)
    swiglu = bool(getattr(cfg, "use_swiglu_ffn", False))
    emb = m.embeddings
    layers = list(m.encoder.layer)
    if getattr(cfg, "hidden_act", "gelu") != "gelu" and not swiglu:
        raise ModelInputError(f"{loaded.spec}: HF DINOv2 activation {cfg.hidden_act!r} has no timm equivalent")
    down = _first(layers[0].mlp, "down_proj", "fc2", "weights_out")
    hidden = int(down.weight.shape[1])
    arch = ("vit_small_patch14_reg4_dinov2" if regs else
            "vit_giant_patch14_dinov2" if swiglu else "vit_small_patch14_dinov2")
    pre = loaded.adapter.preprocess_config(m)
    # HF DINOv2 resamples its positional table to every input size (checkpoints are 518 px, used at the
    # processor's 224-px crop): the timm model is built at the size the source is used at, with the
    # table HF itself computes for that size, so the two agree exactly there.
    _, use_h, use_w = (int(v) for v in pre["input_size"])
    args = {"img_size": [use_h, use_w], "patch_size": int(cfg.patch_size), "embed_dim": D, "depth": L,
            "num_heads": int(cfg.num_attention_heads), "mlp_ratio": (2 * hidden if swiglu else hidden) / D,
            "init_values": 1.0, "num_classes": 0, "global_pool": "token", "dynamic_img_size": False}
    if regs:
        args["reg_tokens"] = regs
        if swiglu:  # timm has no SwiGLU DINOv2 with registers to build from
            raise ModelInputError(f"{loaded.spec}: SwiGLU DINOv2 with registers has no timm skeleton here")
    pretrained_cfg = {"input_size": list(pre["input_size"]), "mean": list(pre["mean"]), "std": list(pre["std"]),
                      "interpolation": pre.get("interpolation", "bicubic"), "crop_pct": pre.get("crop_pct", 1.0),
                      "crop_mode": pre.get("crop_mode", "center"), "num_classes": 0}
    model = timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=pretrained_cfg, **args)
    probe = emb.position_embeddings.new_zeros(1, 1 + (use_h // int(cfg.patch_size)) * (use_w // int(cfg.patch_size)), D)
    pos = emb.interpolate_pos_encoding(probe, use_h, use_w)
    sd = {"patch_embed.proj.weight": emb.patch_embeddings.projection.weight,
          "patch_embed.proj.bias": emb.patch_embeddings.projection.bias,
          "norm.weight": m.layernorm.weight, "norm.bias": m.layernorm.bias}
    if model.no_embed_class:  # timm's reg4 layout: the CLS position folded into the CLS token
        sd["cls_token"], sd["pos_embed"] = emb.cls_token + pos[:, :1], pos[:, 1:]
        sd["reg_token"] = emb.register_tokens
    else:
        sd["cls_token"], sd["pos_embed"] = emb.cls_token, pos
    for i, layer in enumerate(layers):
        sd.update(_hf_dinov2_block_state(layer, f"blocks.{i}.", swiglu))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ModelInputError(f"{loaded.spec}: HF DINOv2 weights do not map onto timm's DINOv2 ViT: "
                              f"{' '.join(str(e).split())[:200]}") from None
    return _checked(loaded, model, args, pretrained_cfg, lambda x: loaded.adapter.forward_pooled(m, x), arch)


def _checked(loaded: LoadedModel, model, args: dict, pretrained_cfg: dict, reference,
             arch: str = TIMM_CLIP_SKELETON) -> LoadedModel:
    """Accept the timm re-expression only if it reproduces the source's pooled output."""
    model.eval()
    _, h, w = pretrained_cfg["input_size"]
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    want, got = reference(x), model(x)
    rel = float((got - want).norm(dim=-1).max() / want.norm(dim=-1).min())
    if not rel < 1e-5:
        raise ModelInputError(f"{loaded.spec}: the timm re-expression differs from the source (relative {rel:.2g})")
    fam = adapter_for(model)  # timm's VisionTransformer or Eva
    # The skeleton was built from timm's default config for `arch`, which names a hub tag (e.g.
    # ...laion2b_ft_in12k_in1k) these weights do not come from: drop it, so nothing (the model card's
    # base_model, config.json) claims that origin; the source's own hub repo, when it has one, is kept.
    model.pretrained_cfg = {k: v for k, v in dict(model.pretrained_cfg).items()
                            if k not in ("hf_hub_id", "hf_hub_filename", "url", "tag", "source")}
    source = SourceInfo("timm", architecture=arch, model_args=args,
                        pretrained_cfg=dict(pretrained_cfg, architecture=arch), converted_from=loaded.spec,
                        base_model=loaded.source.base_model or _source_hub_repo(loaded))
    return LoadedModel(model, fam, loaded.spec, source, fam.data_transform(model), None)


def _source_hub_repo(loaded: LoadedModel) -> str | None:
    """The hub repo the source's weights came from, as its own library's config tells (None for a local
    folder without one)."""
    from surgery.exporters.model_card import source_facts

    return source_facts(loaded.source.to_dict(), loaded.model).get("base_model")


def to_timm(loaded: LoadedModel) -> LoadedModel:
    """`loaded` as a timm model (itself when it already is one)."""
    library = loaded.source.library
    if library == "timm":
        return loaded
    if loaded.adapter.name == "open_clip_timm":
        return open_clip_timm_trunk_to_timm(loaded)
    if library == "open_clip":
        return open_clip_to_timm(loaded)
    if loaded.adapter.name == "hf_clip":
        return hf_clip_to_timm(loaded)
    if loaded.adapter.name == "hf_dinov2":
        return hf_dinov2_to_timm(loaded)
    raise ModelInputError(f"{loaded.spec}: --to timm is available for timm, open_clip CLIP and timm-trunk, HF CLIP and "
                          f"HF DINOv2 inputs, not {loaded.adapter.name}")
