"""Model organisms in other libraries' own module structures (the timm one lives in organism.py).

Each builder returns (model, Planting): a small random-init model of that library with register
neurons planted through the family adapter, deterministic in `seed`, plus a writer that saves it in
the library's own folder layout so tests load it back through the library's real code path.
Keep one builder per library; they share `plant_register_neurons` and, for gated MLPs with separate
gate/up projections, `plant_split_glu`.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .vit import ORGANISM_SIZE, Planting, plant_register_neurons

# ---- open_clip ------------------------------------------------------------------------------------

OPEN_CLIP_ORGANISM_EMBED = 32


def open_clip_organism_config(*, quick_gelu: bool = False, pool_type: str = "tok",
                              attentional_pool: bool = False) -> dict[str, Any]:
    """An open_clip model_cfg (the `model_cfg` of open_clip_config.json): a tiny CLIP, organism-sized
    image tower (64 px, patch 8, width 64, 6 layers, 4 heads), tiny text tower (open_clip's tokenizer)."""
    s = ORGANISM_SIZE
    vision: dict[str, Any] = {"image_size": s["img_size"], "patch_size": s["patch_size"], "width": s["embed_dim"],
                              "layers": s["depth"], "head_width": s["embed_dim"] // s["num_heads"],
                              "mlp_ratio": s["mlp_ratio"], "pool_type": pool_type}
    if attentional_pool:
        vision.update(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)
    text = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
    cfg: dict[str, Any] = {"embed_dim": OPEN_CLIP_ORGANISM_EMBED, "vision_cfg": vision, "text_cfg": text}
    if quick_gelu:
        cfg["quick_gelu"] = True
    return cfg


# ImageNet statistics, as the timm organism: the planted units read the normalised patch mean, and the
# calibration images' black/white triggers must land at the same values in every library.
OPEN_CLIP_ORGANISM_PREPROCESS = {"size": [64, 64], "mode": "RGB", "mean": [0.485, 0.456, 0.406],
                                 "std": [0.229, 0.224, 0.225], "interpolation": "bicubic",
                                 "resize_mode": "shortest", "fill_color": 0}


@torch.no_grad()
def _timm_style_init(visual: nn.Module) -> None:
    """Re-initialise the tower's transformer like timm's ViT (trunc-normal 0.02 weights, zero biases).

    open_clip leaves PyTorch's default (kaiming-uniform) init, whose random residual updates are large
    enough to drown the planted circuit in a 6-block toy; with small random branches the organism
    behaves like the timm one (and like the pretrained models the method targets)."""
    for m in visual.transformer.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.MultiheadAttention):
            nn.init.trunc_normal_(m.in_proj_weight, std=0.02)
            if m.in_proj_bias is not None:
                nn.init.zeros_(m.in_proj_bias)
    nn.init.trunc_normal_(visual.positional_embedding, std=0.02)
    nn.init.trunc_normal_(visual.class_embedding, std=0.02)


def build_open_clip_organism(seed: int = 0, *, quick_gelu: bool = False, pool_type: str = "tok",
                             attentional_pool: bool = False,
                             plant: dict[int, list[tuple[int, int]]] | None = None) -> tuple[nn.Module, Planting]:
    """A tiny open_clip CLIP (eval, fp32) whose image tower has planted register neurons.

    The model class is chosen and built the way `open_clip.create_model` builds it from a config
    (CLIP(**model_cfg)); `model.organism_source` holds the open_clip_config.json content.
    conv1 has no bias in open_clip, so the planting pattern rides on the positional embedding.
    """
    import open_clip
    from open_clip.model import set_model_preprocess_cfg

    cfg = open_clip_organism_config(quick_gelu=quick_gelu, pool_type=pool_type, attentional_pool=attentional_pool)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**copy.deepcopy(cfg))
    set_model_preprocess_cfg(model, copy.deepcopy(OPEN_CLIP_ORGANISM_PREPROCESS))
    model.eval()
    visual = model.visual
    _timm_style_init(visual)
    planting = plant_register_neurons(visual, plant, seed=seed, cls_token=visual.class_embedding,
                                      pos_embed=visual.positional_embedding, pos_includes_cls=True)
    model.organism_source = {"model_cfg": cfg, "preprocess_cfg": copy.deepcopy(OPEN_CLIP_ORGANISM_PREPROCESS)}
    return model, planting


def save_open_clip_organism(model: nn.Module, path: str | Path) -> Path:
    """Save an open_clip organism as an open_clip folder (open_clip_config.json + open_clip_model.safetensors),
    the layout of open_clip's hf-hub repos: loadable with open_clip.create_model('local-dir:PATH')."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    src = model.organism_source
    (path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": src["model_cfg"], "preprocess_cfg": src["preprocess_cfg"]}, indent=2) + "\n")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / "open_clip_model.safetensors"), metadata={"format": "pt"})
    return path


# ---- fake offline hub cache (any library's hf-hub: path) -------------------------------------------

def write_fake_hub_repo(cache_dir: str | Path, repo_id: str, files: dict[str, Path | bytes | str],
                        revision: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay `files` (name -> local file, bytes or text) out as a Hugging Face hub cache entry for `repo_id`:
    CACHE/models--ORG--NAME/refs/main + snapshots/<revision>/NAME. With HF_HUB_OFFLINE=1 and
    HF_HUB_CACHE=CACHE, libraries' real `hf-hub:ORG/NAME` code paths load these files."""
    import shutil

    root = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / revision
    snap.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    for name, src in files.items():
        dst = snap / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, Path):
            shutil.copyfile(src, dst)
        elif isinstance(src, bytes):
            dst.write_bytes(src)
        else:
            dst.write_text(src)
    return snap


# ---- HF transformers (CLIPVisionModel / CLIPModel / Dinov2Model) ------------------------------------

HF_ORGANISM_PREPROCESSOR = {"image_processor_type": "BitImageProcessor", "do_resize": True,
                            "size": {"shortest_edge": 64}, "resample": 3, "do_center_crop": True,
                            "crop_size": {"height": 64, "width": 64}, "do_rescale": True,
                            "rescale_factor": 1 / 255, "do_normalize": True,
                            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                            "do_convert_rgb": True}


def hf_vision_sizes() -> dict[str, Any]:
    s = ORGANISM_SIZE
    return {"hidden_size": s["embed_dim"], "num_hidden_layers": s["depth"], "num_attention_heads": s["num_heads"],
            "image_size": s["img_size"], "patch_size": s["patch_size"]}


def attach_hf_organism_preprocess(model: nn.Module) -> None:
    """The organism's preprocessing (what HF_ORGANISM_PREPROCESSOR gives once saved): 64 px, no crop margin,
    so the calibration images' trigger squares stay patch-aligned."""
    from ..backends import adapter_for
    from ..backends.hf.loader import set_preprocess, preprocess_from_processor

    fam = adapter_for(model)
    set_preprocess(model, preprocess_from_processor(HF_ORGANISM_PREPROCESSOR, fam.preprocess_config(model)))


def build_hf_clip_organism(seed: int = 0, *, full_clip: bool = False, attn_implementation: str = "sdpa",
                           plant: dict[int, list[tuple[int, int]]] | None = None) -> tuple[nn.Module, Planting]:
    """A tiny HF `CLIPVisionModel` (or a whole `CLIPModel` with `full_clip`) with planted register neurons.

    CLIP's patch embedding has no bias: the planting pattern rides on `position_embedding.weight`, the
    CLS embedding is `embeddings.class_embedding`. Save it with `model.save_pretrained(DIR)` plus
    HF_ORGANISM_PREPROCESSOR as preprocessor_config.json.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    s = ORGANISM_SIZE
    # initializer_factor 0.25: weights at the scale timm uses (std ~0.02), as in the timm organism
    vcfg = CLIPVisionConfig(intermediate_size=int(s["embed_dim"] * s["mlp_ratio"]), projection_dim=32, initializer_factor=0.25,
                            **hf_vision_sizes())
    torch.manual_seed(seed)
    if full_clip:
        tcfg = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                "vocab_size": 49408, "max_position_embeddings": 16}
        model = CLIPModel(CLIPConfig(text_config=tcfg, vision_config=vcfg.to_dict(), projection_dim=32))
        vision = model.vision_model
    else:
        model = CLIPVisionModel(vcfg)
        vision = model
    model.set_attn_implementation(attn_implementation)
    model.eval()
    attach_hf_organism_preprocess(model)
    emb = vision.embeddings
    planting = plant_register_neurons(model, plant, seed=seed, cls_token=emb.class_embedding,
                                      pos_embed=emb.position_embedding.weight, pos_includes_cls=True)
    return model, planting


class SplitGluPlanting:
    """Planting view for gated MLPs with separate gate/up projections (HF `gate_proj`/`up_proj`, timm
    SwiGLU `fc1_g`/`fc1_x`). `plant_register_neurons` writes into one packed [gate; up] weight; here the
    two projections are temporarily re-pointed at halves of one packed parameter so those writes land
    in them, and `finish()` gives each projection its own storage again (so saving never sees shared
    tensors). Use it through `plant_split_glu`."""

    def __init__(self, family: Any, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj",
                 act: str = "act_fn") -> None:
        self.family, self.names = family, (gate, up, down, act)
        self._touched: list[nn.Module] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.family, name)

    def mlp_weights(self, mlp: nn.Module):
        from ..core.modules import MlpWeights

        gate, up, down, act = self.names
        if not all(hasattr(mlp, n) for n in (gate, up, down)):
            return self.family.mlp_weights(mlp)
        g, u = getattr(mlp, gate), getattr(mlp, up)
        H = g.weight.shape[0]
        w = nn.Parameter(torch.cat([g.weight.data, u.weight.data]))
        b = nn.Parameter(torch.cat([g.bias.data, u.bias.data]))
        g.weight, u.weight = nn.Parameter(w.data[:H]), nn.Parameter(w.data[H:])
        g.bias, u.bias = nn.Parameter(b.data[:H]), nn.Parameter(b.data[H:])
        self._touched.append(mlp)
        d = getattr(mlp, down)
        return MlpWeights(w, b, d.weight, d.bias, getattr(mlp, act), gated=True)

    def finish(self) -> None:
        gate, up, _, _ = self.names
        for mlp in self._touched:
            for lin in (getattr(mlp, gate), getattr(mlp, up)):
                lin.weight = nn.Parameter(lin.weight.data.clone())
                lin.bias = nn.Parameter(lin.bias.data.clone())


def plant_split_glu(model: nn.Module, plant: dict[int, list[tuple[int, int]]] | None, *, seed: int,
                    names: tuple[str, str, str, str] = ("gate_proj", "up_proj", "down_proj", "act_fn"),
                    **where: Any) -> Planting:
    """`plant_register_neurons` through a SplitGluPlanting view on `model`'s adapter (gated MLPs with
    separate gate/up projections; other MLPs are planted as usual); `where`: cls_token, pos_embed, ..."""
    from ..backends import adapter_for

    view = SplitGluPlanting(adapter_for(model), *names)
    try:
        return plant_register_neurons(model, plant, seed=seed, family=view, **where)  # type: ignore[arg-type]
    finally:
        view.finish()


def registers_like_cls(register_tokens: torch.Tensor, cls_token: torch.Tensor) -> None:
    """Trained registers start as the CLS pattern (well conditioned), not exact zeros."""
    with torch.no_grad():
        register_tokens.copy_(cls_token.expand_as(register_tokens))


def build_hf_dinov2_organism(seed: int = 0, *, swiglu: bool = False, num_register_tokens: int = 0,
                             attn_implementation: str = "sdpa",
                             plant: dict[int, list[tuple[int, int]]] | None = None) -> tuple[nn.Module, Planting]:
    """A tiny HF `Dinov2Model` (GELU MLP, or the SwiGLU FFN of DINOv2 giant) with planted register neurons;
    `num_register_tokens > 0` builds a `Dinov2WithRegistersModel`. LayerScale starts at 1.

    The patch projection has a bias (carries the pattern); the CLS parameter is `embeddings.cls_token`.
    """
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    sizes = dict(hf_vision_sizes(), mlp_ratio=int(ORGANISM_SIZE["mlp_ratio"]), layerscale_value=1.0,
                 use_swiglu_ffn=swiglu)
    torch.manual_seed(seed)
    if num_register_tokens:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=num_register_tokens, **sizes))
    else:
        model = Dinov2Model(Dinov2Config(**sizes))
    model.set_attn_implementation(attn_implementation)
    model.eval()
    attach_hf_organism_preprocess(model)
    emb = model.embeddings
    planting = plant_split_glu(model, plant, seed=seed, cls_token=emb.cls_token,
                               pos_embed=emb.position_embeddings, pos_includes_cls=True)
    if num_register_tokens:
        registers_like_cls(emb.register_tokens, emb.cls_token)
    return model, planting


def save_hf_organism(model: nn.Module, path: str | Path, *, preprocessor: bool = True) -> Path:
    """Save an HF organism through transformers' own `save_pretrained` (config.json + model.safetensors),
    plus preprocessor_config.json (ImageNet mean/std, 64 px) unless `preprocessor=False`."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    if preprocessor:
        (path / "preprocessor_config.json").write_text(json.dumps(HF_ORGANISM_PREPROCESSOR, indent=2) + "\n")
    return path


# ---- DINOv2 torch-hub layout (facebookresearch/dinov2 state dicts) ---------------------------------

DINOV2_HUB_VARIANTS = {"plain": ("vit_small_patch14_dinov2", {}),
                       "swiglu": ("vit_giant_patch14_dinov2", {}),
                       "reg4": ("vit_small_patch14_reg4_dinov2", {})}


def build_dinov2_hub_organism(seed: int = 0, variant: str = "plain", *,
                              plant: dict[int, list[tuple[int, int]]] | None = None
                              ) -> tuple[nn.Module, Planting, dict[str, torch.Tensor]]:
    """A small timm DINOv2 with planted register neurons, and the same weights as a DINOv2 torch-hub
    state dict (`blocks.i.mlp.fc1` / SwiGLU `w12`+`w3`, `ls1.gamma`, `mask_token`, `register_tokens`,
    a CLS row in `pos_embed`). One head of width 64 keeps DINOv2's head size of 64, which is how a hub
    checkpoint's head count is read back.
    """
    import timm

    arch, extra = DINOV2_HUB_VARIANTS[variant]
    s = ORGANISM_SIZE
    args = dict(img_size=s["img_size"], patch_size=s["patch_size"], embed_dim=s["embed_dim"], depth=s["depth"], num_heads=1,
                mlp_ratio=s["mlp_ratio"], init_values=1.0, num_classes=0, dynamic_img_size=False, **extra)
    overlay = dict(input_size=(3, s["img_size"], s["img_size"]), crop_pct=1.0, num_classes=0)
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=overlay, **args)
    model.eval()
    planting = plant_register_neurons(model, plant, seed=seed, cls_token=model.cls_token, pos_embed=model.pos_embed,
                                      pos_includes_cls=not model.no_embed_class)
    if model.reg_token is not None:  # trained registers: the CLS pattern (well conditioned), not ~1e-6 noise
        with torch.no_grad():
            model.reg_token.copy_(model.cls_token.expand_as(model.reg_token))
    return model, planting, timm_to_dinov2_hub(model)


def timm_to_dinov2_hub(model: nn.Module) -> dict[str, torch.Tensor]:
    """timm DINOv2 weights in the torch-hub layout (the inverse of timm's dinov2 checkpoint filter)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    swiglu = type(model.blocks[0].mlp).__name__ == "GluMlp"  # timm's SwiGLUPacked
    for k, v in sd.items():
        if swiglu and ".mlp.fc1." in k:
            k = k.replace(".mlp.fc1.", ".mlp.w12.")
        elif swiglu and ".mlp.fc2." in k:
            k = k.replace(".mlp.fc2.", ".mlp.w3.")
        out[k] = v
    D = out["cls_token"].shape[-1]
    if "reg_token" in out:  # timm keeps no CLS position for registers models; the hub layout does
        out["register_tokens"] = out.pop("reg_token")
        out["pos_embed"] = torch.cat([torch.zeros(1, 1, D), out["pos_embed"]], dim=1)
    out["mask_token"] = torch.zeros(1, D)
    return out
