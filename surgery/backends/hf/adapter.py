"""HF transformers vision towers: `CLIPVisionModel` / `CLIPModel` and `Dinov2Model` (+ with registers).

- CLIP (`CLIPVisionModel`, `CLIPVisionModelWithProjection`, `CLIPModel` through its `vision_model`):
  `encoder.layers[i].mlp.{fc1, activation_fn, fc2}`, attention `self_attn.{q,k}_proj` after
  `layer_norm1`, registers enter `pre_layrnorm` (CLIP's ln_pre). Pooled = `pooler_output`
  (post_layernorm of token 0); `CLIPModel` and `...WithProjection` pool the projected image embedding.
  Tokens = `last_hidden_state` (the encoder output, before post_layernorm, as HF returns it).
- DINOv2 (`Dinov2Model`, `Dinov2WithRegistersModel`): `encoder.layer[i].mlp.{fc1, activation_fn, fc2}`
  or the SwiGLU FFN `{gate_proj, up_proj, down_proj}` (units of the gated hidden layer); there is no
  pre-norm, so registers are inserted at the end of the embeddings (`embeddings.dropout` is wrapped:
  after the positional embedding, before block 0). Prefix = CLS (+ the trained registers).
  Pooled = `pooler_output` (layernormed CLS = token 0), tokens = `last_hidden_state`.

Token layout of a baked model's `last_hidden_state`: [CLS, trained registers (DINOv2-reg only),
R test-time registers, patches]; patch tokens start at `num_prefix_tokens` (an attribute the adapter
keeps on the vision tower). HF's own pooling only reads token 0, so it is unaffected.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ...core.errors import ModelInputError
from ...core.modules import MlpWeights, RegisterMlp
from ...core.adapter import AttentionParts, Adapter
from .family import ORGANISMS, Organism, from_transformers, hf_family, transformers_classes

# Preprocessing defaults when a model comes without preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PREFIX_ATTR = "num_prefix_tokens"  # kept on the vision tower: tokens before the patches
PREPROCESS_ATTR = "surgery_preprocess"  # optional dict set by the loader (from preprocessor_config.json)


class HFVisionAdapter(Adapter):
    """Shared parts of the HF adapters: config-driven sizes, preprocessing, the prefix attribute. A
    subclass is registered with its family record (`@hf_family`, family.py), which names its classes."""

    default_mean: tuple[float, ...] = IMAGENET_MEAN
    default_std: tuple[float, ...] = IMAGENET_STD
    default_crop_pct: float = 1.0

    def _classes(self) -> tuple[type, ...]:
        return transformers_classes(*type(self).family.stock_classes)  # type: ignore[attr-defined]

    def matches(self, model: nn.Module) -> bool:
        if not from_transformers(model):
            return False
        try:
            return isinstance(model, self._classes())
        except ImportError:
            return False

    def vision(self, model: nn.Module) -> nn.Module:
        return model

    def embed_dim(self, model: nn.Module) -> int:
        return int(self.vision(model).config.hidden_size)

    def default_prefix(self, vision: nn.Module) -> int:
        return 1

    def num_prefix_tokens(self, model: nn.Module) -> int:
        v = self.vision(model)
        n = getattr(v, PREFIX_ATTR, None)
        return int(n) if n is not None else self.default_prefix(v)

    def set_num_prefix_tokens(self, model: nn.Module, n: int) -> None:
        # HF pools token 0 (CLS) in both families, so only our own bookkeeping needs the count.
        setattr(self.vision(model), PREFIX_ATTR, int(n))

    # --- preprocessing -----------------------------------------------------------------------
    def preprocess_config(self, model: nn.Module) -> dict:
        """{'input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'crop_mode'} for timm's transform."""
        v = self.vision(model)
        cfg = getattr(model, PREPROCESS_ATTR, None) or getattr(v, PREPROCESS_ATTR, None)
        if cfg:
            return dict(cfg)
        size = v.config.image_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return {"input_size": (3, int(h), int(w)), "mean": tuple(self.default_mean), "std": tuple(self.default_std),
                "crop_pct": self.default_crop_pct, "interpolation": "bicubic", "crop_mode": "center"}

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        return tuple(self.preprocess_config(model)["input_size"])  # type: ignore[return-value]

    def data_transform(self, model: nn.Module) -> Callable:
        import timm.data

        cfg = self.preprocess_config(model)
        return timm.data.create_transform(input_size=tuple(cfg["input_size"]), interpolation=cfg["interpolation"],
                                          mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), crop_pct=cfg["crop_pct"],
                                          crop_mode=cfg.get("crop_mode", "center"), is_training=False)

    # --- MLPs (HF's two layouts: {fc1, activation_fn, fc2} and gated {gate_proj, up_proj, down_proj}) ------
    def _plain_mlp_weights(self, mlp: nn.Module) -> MlpWeights:
        return MlpWeights(mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, mlp.activation_fn, gated=False)

    @staticmethod
    def _is_plain(mlp: nn.Module) -> bool:
        return hasattr(mlp, "fc1") and hasattr(mlp, "fc2") and hasattr(mlp, "activation_fn")

    @staticmethod
    def _is_swiglu(mlp: nn.Module) -> bool:
        return all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))

    def _gated_mlp_weights(self, mlp: nn.Module) -> MlpWeights:
        """Units of the gated hidden layer: fc1 rows are [gate; up]."""
        g, u = mlp.gate_proj, mlp.up_proj
        b = None if g.bias is None else torch.cat([g.bias, u.bias])
        return MlpWeights(torch.cat([g.weight, u.weight]), b, mlp.down_proj.weight, mlp.down_proj.bias,
                          mlp.act_fn, gated=True)

    def _plain_mlp(self, cls: type, weights: MlpWeights) -> nn.Module:
        """The stock `cls` ({fc1, activation_fn, fc2}) holding `weights`, built without a whole config."""
        D, H = weights.fc1_weight.shape[1], weights.hidden
        mlp = cls.__new__(cls)
        nn.Module.__init__(mlp)
        mlp.activation_fn = weights.act
        mlp.fc1 = nn.Linear(D, H, bias=weights.fc1_bias is not None)
        mlp.fc2 = nn.Linear(H, weights.fc2_weight.shape[0], bias=weights.fc2_bias is not None)
        mlp = mlp.to(weights.fc1_weight.device, weights.fc1_weight.dtype)
        self._copy_linear(mlp.fc1, weights.fc1_weight, weights.fc1_bias)
        self._copy_linear(mlp.fc2, weights.fc2_weight, weights.fc2_bias)
        return mlp

    def _gated_mlp(self, cls: type, weights: MlpWeights) -> nn.Module:
        """`cls` ({gate_proj, up_proj, down_proj, act_fn}) holding gated `weights` (fc1 rows [gate; up])."""
        D, H = weights.fc1_weight.shape[1], weights.hidden
        mlp = cls.__new__(cls)
        nn.Module.__init__(mlp)
        mlp.gate_proj = nn.Linear(D, H, bias=weights.fc1_bias is not None)
        mlp.up_proj = nn.Linear(D, H, bias=weights.fc1_bias is not None)
        mlp.down_proj = nn.Linear(H, weights.fc2_weight.shape[0], bias=weights.fc2_bias is not None)
        mlp.act_fn = weights.act
        mlp = mlp.to(weights.fc1_weight.device, weights.fc1_weight.dtype)
        gb = ub = None
        if weights.fc1_bias is not None:
            gb, ub = weights.fc1_bias[:H], weights.fc1_bias[H:]
        self._copy_linear(mlp.gate_proj, weights.fc1_weight[:H], gb)
        self._copy_linear(mlp.up_proj, weights.fc1_weight[H:], ub)
        self._copy_linear(mlp.down_proj, weights.fc2_weight, weights.fc2_bias)
        return mlp

    def _self_attn_parts(self, block: nn.Module) -> AttentionParts:
        """CLIP / SigLIP layers: `self_attn.{q,k}_proj` after `layer_norm1`."""
        a = block.self_attn
        return AttentionParts(norm=block.layer_norm1, q_weight=a.q_proj.weight, q_bias=a.q_proj.bias,
                              k_weight=a.k_proj.weight, k_bias=a.k_proj.bias, num_heads=int(a.num_heads))

    # --- running the model: the vision tower called with pixel_values -------------------------
    def _run(self, model: nn.Module, pixels: torch.Tensor):
        return self.vision(model)(pixel_values=pixels, return_dict=True)

    def _pool(self, model: nn.Module, out) -> torch.Tensor:
        return out.pooler_output

    def forward_tokens(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return self._run(model, pixels).last_hidden_state

    def forward_pooled(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return self._pool(model, self._run(model, pixels))

    def forward_both(self, model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._run(model, pixels)
        return self._pool(model, out), out.last_hidden_state

    def _copy_linear(self, lin: nn.Linear, w: torch.Tensor, b: torch.Tensor | None) -> None:
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)


@hf_family(model_types={"clip": "CLIPModel", "clip_vision_model": "CLIPVisionModel"},
           arch_classes=("CLIPVisionModelWithProjection",),
           organism=Organism(ORGANISMS + "families:build_hf_clip_organism"))
class HFClipVision(HFVisionAdapter):
    """`CLIPVisionModel`, `CLIPVisionModelWithProjection` and the vision tower of `CLIPModel` (CLIPModel stays
    whole; its vision tower is what is edited)."""

    name = "hf_clip"
    default_mean = CLIP_MEAN
    default_std = CLIP_STD

    def vision(self, model: nn.Module) -> nn.Module:
        return model.vision_model if hasattr(model, "vision_model") else model

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return list(self.vision(model).encoder.layers)

    def mlp_weights(self, mlp: nn.Module) -> MlpWeights:
        if isinstance(mlp, RegisterMlp):
            return mlp.merged_weights()
        if self._is_plain(mlp):
            return self._plain_mlp_weights(mlp)
        raise ModelInputError(f"unsupported HF CLIP MLP type {type(mlp).__name__}")

    def make_mlp(self, weights: MlpWeights) -> nn.Module:
        from transformers.models.clip.modeling_clip import CLIPMLP

        if weights.gated:
            raise ModelInputError("HF CLIP has no gated MLPs")
        return self._plain_mlp(CLIPMLP, weights)

    def down_proj(self, mlp: nn.Module) -> nn.Module:
        return mlp.fc2

    def insertion_point(self, model: nn.Module) -> tuple[nn.Module, str]:
        return self.vision(model), "pre_layrnorm"

    def attention(self, block: nn.Module) -> AttentionParts:
        return self._self_attn_parts(block)

    def patch_embed(self, model: nn.Module) -> nn.Conv2d:
        return self.vision(model).embeddings.patch_embedding

    def _pool(self, model: nn.Module, out) -> torch.Tensor:
        pooled = out.pooler_output
        proj = getattr(model, "visual_projection", None)
        return proj(pooled) if proj is not None else pooled


@hf_family(model_types={"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"},
           organism=Organism(ORGANISMS + "families:build_hf_dinov2_organism"))
class HFDinov2(HFVisionAdapter):
    """`Dinov2Model` and `Dinov2WithRegistersModel` (plain GELU MLP or SwiGLU FFN, LayerScale)."""

    name = "hf_dinov2"
    default_crop_pct = 224 / 256

    def default_prefix(self, vision: nn.Module) -> int:
        return 1 + int(getattr(vision.config, "num_register_tokens", 0) or 0)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return list(model.encoder.layer)

    def mlp_weights(self, mlp: nn.Module) -> MlpWeights:
        if isinstance(mlp, RegisterMlp):
            return mlp.merged_weights()
        if self._is_swiglu(mlp):
            return self._gated_mlp_weights(mlp)
        if hasattr(mlp, "weights_in"):  # packed SwiGLU of older transformers
            return MlpWeights(mlp.weights_in.weight, mlp.weights_in.bias, mlp.weights_out.weight,
                              mlp.weights_out.bias, nn.SiLU(), gated=True)
        if self._is_plain(mlp):
            return self._plain_mlp_weights(mlp)
        raise ModelInputError(f"unsupported HF DINOv2 MLP type {type(mlp).__name__}")

    def make_mlp(self, weights: MlpWeights) -> nn.Module:
        from transformers.models.dinov2 import modeling_dinov2 as md

        if weights.gated:
            stock = md.Dinov2SwiGLUFFN
            # transformers 5 splits the SwiGLU into gate/up/down; older releases pack `weights_in`: use an
            # equivalent module with the new layout there (never a stock module with another forward)
            return self._gated_mlp(stock if "gate_proj" in stock.forward.__code__.co_names else _SwiGLU, weights)
        return self._plain_mlp(md.Dinov2MLP, weights)

    def down_proj(self, mlp: nn.Module) -> nn.Module:
        if isinstance(mlp, RegisterMlp):
            return mlp.fc2
        if self._is_swiglu(mlp):
            return mlp.down_proj
        if hasattr(mlp, "weights_out"):
            return mlp.weights_out
        return mlp.fc2

    def insertion_point(self, model: nn.Module) -> tuple[nn.Module, str]:
        # No pre-norm: the last op of the embeddings (dropout, after the positional embedding and the
        # trained registers) is where test-time registers enter.
        return model.embeddings, "dropout"

    def attention(self, block: nn.Module) -> AttentionParts:
        a = block.attention
        if hasattr(a, "q_proj"):
            q, k = a.q_proj, a.k_proj
        elif hasattr(getattr(a, "attention", None), "query"):  # transformers 4.x layout
            a = a.attention
            q, k = a.query, a.key
        else:
            raise ModelInputError(f"unsupported HF DINOv2 attention module {type(a).__name__}")
        return AttentionParts(norm=block.norm1, q_weight=q.weight, q_bias=q.bias, k_weight=k.weight, k_bias=k.bias,
                              num_heads=int(a.num_attention_heads))

    def patch_embed(self, model: nn.Module) -> nn.Conv2d:
        return model.embeddings.patch_embeddings.projection


class _SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)) with transformers 5's parameter names (for un-baking on older releases)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


HF_CLIP = HFClipVision.family.adapter  # type: ignore[attr-defined]
HF_DINOV2 = HFDinov2.family.adapter  # type: ignore[attr-defined]
