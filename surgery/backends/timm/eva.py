"""timm `Eva` (DINOv3 `vit_*_dinov3`, EVA02 `eva02_*`, Perception Encoder `vit_pe_core_*`).

Blocks `blocks[i]` (`EvaBlock`), MLP `blocks[i].mlp` as `Mlp`, `SwiGLU` (fc1_g / fc1_x) or `GluMlp`
(packed [gate; up]); the same MLP views as timm's VisionTransformer. Prefix tokens: CLS and trained
registers (`num_prefix_tokens`, DINOv3: 1 + 4). Registers enter `norm_pre` (after the absolute
positional embedding, when the model has one).

RoPE: every attention module applies rotary positions to the tokens after its own
`attn.num_prefix_tokens` and leaves the prefix unrotated. `set_num_prefix_tokens` updates the model
and every attention module, so a test-time register is a prefix token: it gets no rotary position,
exactly like CLS and DINOv3's trained registers, in the hooked reference and in the baked model alike
(the rope table covers the patches only, so nothing else would even have the right shape).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ...core.errors import ModelInputError
from ...core.modules import MlpWeights
from ...core.adapter import AttentionParts
from .adapter import TimmViT


@dataclass
class RopeAttentionParts(AttentionParts):
    """AttentionParts that rotate the non-prefix queries and keys like timm's Eva attention does."""

    rope: Optional[torch.Tensor] = None  # [P, 2 * head_dim] (sin, cos), for P patch tokens
    num_prefix: int = 0
    rotate_half: bool = False

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from timm.layers import apply_rot_embed_cat

        p = self.num_prefix
        if self.rope is None or q.shape[2] - p != self.rope.shape[-2]:
            return q, k
        rope = self.rope.to(q.dtype)
        return (torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=self.rotate_half)], dim=2),
                torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=self.rotate_half)], dim=2))


class TimmEva(TimmViT):
    name = "timm_eva"

    def __init__(self) -> None:
        # block -> its model, so attention(block) can build the model's rope table for diagnostics
        self._owner: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()

    def matches(self, model: nn.Module) -> bool:
        from timm.models.eva import Eva

        return isinstance(model, Eva)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        blocks = list(model.blocks)
        for b in blocks:
            self._owner[b] = weakref.ref(model)
        return blocks

    def mlp_weights(self, mlp: nn.Module) -> MlpWeights:
        from timm.layers.mlp import GluMlp, SwiGLU

        if isinstance(mlp, (SwiGLU, GluMlp)) and not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise ModelInputError(
                "this Eva model normalises its MLP hidden layer (scale_mlp=True, e.g. EVA02-CLIP): the LayerNorm "
                "mixes all hidden units, so register neurons cannot be split off exactly")
        return super().mlp_weights(mlp)

    def make_mlp(self, weights: MlpWeights) -> nn.Module:
        from timm.layers.mlp import SwiGLU

        if not weights.gated:
            return super().make_mlp(weights)
        # Eva's gated MLP is SwiGLU (separate fc1_g / fc1_x): rebuild that, so un-baking restores its keys.
        D, H = weights.fc1_weight.shape[1], weights.hidden
        mlp = SwiGLU(D, H, weights.fc2_weight.shape[0], act_layer=nn.SiLU, bias=weights.fc1_bias is not None)
        mlp.act = weights.act
        with torch.no_grad():
            mlp.fc1_g.weight.copy_(weights.fc1_weight[:H])
            mlp.fc1_x.weight.copy_(weights.fc1_weight[H:])
            if weights.fc1_bias is not None:
                mlp.fc1_g.bias.copy_(weights.fc1_bias[:H])
                mlp.fc1_x.bias.copy_(weights.fc1_bias[H:])
            mlp.fc2.weight.copy_(weights.fc2_weight)
            if weights.fc2_bias is not None:
                mlp.fc2.bias.copy_(weights.fc2_bias)
        return mlp.to(weights.fc1_weight.device, weights.fc1_weight.dtype)

    def set_num_prefix_tokens(self, model: nn.Module, n: int) -> None:
        model.num_prefix_tokens = int(n)
        for blk in model.blocks:  # rope skips the first attn.num_prefix_tokens tokens
            blk.attn.num_prefix_tokens = int(n)
        pd = getattr(model, "patch_drop", None)
        if pd is not None and hasattr(pd, "num_prefix_tokens"):
            pd.num_prefix_tokens = int(n)

    def attention(self, block: nn.Module) -> AttentionParts:
        attn = block.attn
        A = attn.num_heads * attn.head_dim
        if getattr(attn, "qkv", None) is not None:
            w = attn.qkv.weight
            b = attn.qkv.bias
            q_b = attn.q_bias if getattr(attn, "q_bias", None) is not None else (None if b is None else b[:A])
            k_b = attn.k_bias if getattr(attn, "k_bias", None) is not None else (None if b is None else b[A:2 * A])
            q_w, k_w = w[:A], w[A:2 * A]
        elif getattr(attn, "q_proj", None) is not None:
            q_w, q_b = attn.q_proj.weight, attn.q_proj.bias
            k_w, k_b = attn.k_proj.weight, attn.k_proj.bias
        else:
            raise ModelInputError(f"unsupported Eva attention module {type(attn).__name__}")
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return RopeAttentionParts(
            norm=block.norm1, q_weight=q_w, q_bias=q_b, k_weight=k_w, k_bias=k_b, num_heads=int(attn.num_heads),
            q_norm=None if isinstance(qn, nn.Identity) else qn, k_norm=None if isinstance(kn, nn.Identity) else kn,
            rope=self._rope(block), num_prefix=int(attn.num_prefix_tokens),
            rotate_half=bool(getattr(attn, "rotate_half", False)))

    def _rope(self, block: nn.Module) -> Optional[torch.Tensor]:
        """The model's rope table for its configured input grid (eval mode), or None without RoPE."""
        ref = self._owner.get(block)
        model = ref() if ref is not None else None
        if model is None or getattr(model, "rope", None) is None:
            return None
        grid = tuple(model.patch_embed.grid_size)
        rope = model.rope.get_embed(shape=list(grid))
        if getattr(model, "rope_mixed", False):  # depth-dependent tables [depth, heads, N, dim]: not a single table
            rope = rope[list(model.blocks).index(block)]
            return rope if rope.dim() == 2 else None
        return rope

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        cfg = self._data_config(model)
        return tuple(cfg["input_size"])  # type: ignore[return-value]


TIMM_EVA = TimmEva()
