"""HF transformers: `DINOv3ViTModel` and `SiglipVisionModel`.

- DINOv3 (`DINOv3ViTModel`): blocks `model.layer[i]` (encoder at `model.model`), MLP
  `{up_proj, act_fn, down_proj}` or gated `{gate_proj, up_proj, down_proj}`, LayerScale, CLS + trained
  registers (`embeddings.register_tokens`), RoPE. HF's rotary code rotates the *last* P tokens (P =
  patches) and treats every token before them as prefix, so a test-time register placed after the
  trained registers gets no rotary position, as in timm's Eva. Pooled = `pooler_output` (layernormed
  CLS), tokens = `last_hidden_state` (layernormed).
- SigLIP (`SiglipVisionModel`): blocks `encoder.layers[i]`, MLP `{fc1, activation_fn, fc2}`, no CLS
  (prefix 0: the register goes first), attention-pool head `head` reading every token (the register
  included, as in the hooked reference). Pooled = `pooler_output` (the head's output), tokens =
  `last_hidden_state` (post_layernorm).

Neither has a pre-norm, and their encoders are called with keyword or extra arguments, so registers
enter at the input of block 0 (the first encoder layer is wrapped by PrependRegisters): after the
embeddings, before any block, with no positional embedding. `blocks()` unwraps it.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ...core.errors import ModelInputError
from ...core.modules import MlpWeights, PrependRegisters, PrependRegistersToLayer, RegisterMlp
from ...core.adapter import AttentionParts
from .adapter import HFClipVision, HFDinov2, HFVisionAdapter
from .family import ORGANISMS, Organism, hf_family


def _unwrap(block: nn.Module) -> nn.Module:
    return block.inner if isinstance(block, PrependRegisters) else block


@dataclass
class HFRopeAttentionParts(AttentionParts):
    """Attention probabilities with HF DINOv3's rotary embedding on the last P tokens (P = rows of cos/sin)."""

    cos: Optional[torch.Tensor] = None
    sin: Optional[torch.Tensor] = None

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        N = q.shape[2]
        if self.cos is None or N < self.cos.shape[-2]:
            return q, k
        P = self.cos.shape[-2]
        cos, sin = self.cos.to(q.dtype), self.sin.to(q.dtype)

        def rot(t: torch.Tensor) -> torch.Tensor:
            half = t.shape[-1] // 2
            return torch.cat([-t[..., half:], t[..., :half]], dim=-1)

        return (torch.cat([q[:, :, :N - P], q[:, :, N - P:] * cos + rot(q[:, :, N - P:]) * sin], dim=2),
                torch.cat([k[:, :, :N - P], k[:, :, N - P:] * cos + rot(k[:, :, N - P:]) * sin], dim=2))


class _FirstLayerInsertion(HFVisionAdapter):
    """Registers enter at the input of the first encoder layer (no pre-norm, keyword-called encoders)."""

    inserter = PrependRegistersToLayer

    def _layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return [_unwrap(b) for b in self._layers(model)]

    def insertion_point(self, model: nn.Module) -> tuple[nn.Module, str]:
        return self._layers(model), "0"


@hf_family(model_types={"dinov3_vit": "DINOv3ViTModel"}, organism=Organism(ORGANISMS + "eva:build_hf_dinov3_organism"))
class HFDinov3(_FirstLayerInsertion):
    name = "hf_dinov3"

    def _layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layer

    default_prefix = HFDinov2.default_prefix  # CLS + the trained registers

    def mlp_weights(self, mlp: nn.Module) -> MlpWeights:
        if isinstance(mlp, RegisterMlp):
            return mlp.merged_weights()
        if self._is_swiglu(mlp):
            return self._gated_mlp_weights(mlp)
        if all(hasattr(mlp, n) for n in ("up_proj", "down_proj", "act_fn")):
            return MlpWeights(mlp.up_proj.weight, mlp.up_proj.bias, mlp.down_proj.weight, mlp.down_proj.bias,
                              mlp.act_fn, gated=False)
        raise ModelInputError(f"unsupported HF DINOv3 MLP type {type(mlp).__name__}")

    def make_mlp(self, weights: MlpWeights) -> nn.Module:
        from transformers.models.dinov3_vit import modeling_dinov3_vit as md

        D, H, O = weights.fc1_weight.shape[1], weights.hidden, weights.fc2_weight.shape[0]
        if weights.gated:
            mlp = self._gated_mlp(md.DINOv3ViTGatedMLP, weights)
        else:  # {up_proj, act_fn, down_proj}: DINOv3's own plain layout
            mlp = md.DINOv3ViTMLP.__new__(md.DINOv3ViTMLP)  # the stock module, without needing a whole config
            nn.Module.__init__(mlp)
            mlp.act_fn = weights.act
            mlp.up_proj = nn.Linear(D, H, bias=weights.fc1_bias is not None)
            mlp.down_proj = nn.Linear(H, O, bias=weights.fc2_bias is not None)
            mlp = mlp.to(weights.fc1_weight.device, weights.fc1_weight.dtype)
            self._copy_linear(mlp.up_proj, weights.fc1_weight, weights.fc1_bias)
            self._copy_linear(mlp.down_proj, weights.fc2_weight, weights.fc2_bias)
        mlp.hidden_size, mlp.intermediate_size = D, H
        return mlp

    def down_proj(self, mlp: nn.Module) -> nn.Module:
        return mlp.fc2 if isinstance(mlp, RegisterMlp) else mlp.down_proj

    def attention(self, block: nn.Module) -> AttentionParts:
        a = block.attention
        cos = sin = None
        ref = getattr(self, "_rope_owner", None)
        model = ref() if ref is not None else None
        if model is not None:
            cos, sin = self._rope(model)
        return HFRopeAttentionParts(norm=block.norm1, q_weight=a.q_proj.weight, q_bias=a.q_proj.bias,
                                    k_weight=a.k_proj.weight, k_bias=a.k_proj.bias, num_heads=int(a.num_heads),
                                    cos=cos, sin=sin)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        self._rope_owner = weakref.ref(model)  # attention() needs the model's rope for its input size
        return super().blocks(model)

    def _rope(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        _, h, w = self.input_size(model)
        ref = model.embeddings.patch_embeddings.weight
        return model.rope_embeddings(torch.zeros(1, 3, h, w, device=ref.device, dtype=ref.dtype))

    def patch_embed(self, model: nn.Module) -> nn.Conv2d:
        return model.embeddings.patch_embeddings


@hf_family(model_types={"siglip_vision_model": "SiglipVisionModel"},
           organism=Organism(ORGANISMS + "eva:build_hf_siglip_organism"))
class HFSiglipVision(_FirstLayerInsertion):
    name = "hf_siglip"
    default_mean = (0.5, 0.5, 0.5)
    default_std = (0.5, 0.5, 0.5)

    def _layers(self, model: nn.Module) -> nn.ModuleList:
        return self.vision(model).encoder.layers

    vision = HFClipVision.vision  # the tower itself, or `vision_model` of a composite

    def default_prefix(self, vision: nn.Module) -> int:
        return 0  # no CLS token

    def mlp_weights(self, mlp: nn.Module) -> MlpWeights:
        if isinstance(mlp, RegisterMlp):
            return mlp.merged_weights()
        if self._is_plain(mlp):
            return self._plain_mlp_weights(mlp)
        raise ModelInputError(f"unsupported HF SigLIP MLP type {type(mlp).__name__}")

    def make_mlp(self, weights: MlpWeights) -> nn.Module:
        from transformers.models.siglip.modeling_siglip import SiglipMLP

        return self._plain_mlp(SiglipMLP, weights)

    def down_proj(self, mlp: nn.Module) -> nn.Module:
        return mlp.fc2

    def attention(self, block: nn.Module) -> AttentionParts:
        return self._self_attn_parts(block)

    def patch_embed(self, model: nn.Module) -> nn.Conv2d:
        return self.vision(model).embeddings.patch_embedding

    def _pool(self, model: nn.Module, out) -> torch.Tensor:
        return out.pooler_output if out.pooler_output is not None else out.last_hidden_state.mean(1)


HF_DINOV3 = HFDinov3.family.adapter  # type: ignore[attr-defined]
HF_SIGLIP = HFSiglipVision.family.adapter  # type: ignore[attr-defined]
