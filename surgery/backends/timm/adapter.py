"""timm `VisionTransformer` (CLIP, DINOv2, DeiT-III, SigLIP, ...): blocks[i].mlp.{fc1, act, fc2}."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ...core.errors import ModelInputError
from ...core.modules import MlpWeights, RegisterMlp
from ...core.adapter import AttentionParts, Adapter


class TimmViT(Adapter):
    name = "timm"

    def matches(self, model: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return list(model.blocks)

    def mlp_weights(self, mlp: nn.Module) -> MlpWeights:
        from timm.layers.mlp import GluMlp, Mlp, SwiGLU

        if isinstance(mlp, RegisterMlp):
            return mlp.merged_weights()
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise ModelInputError("MLPs with a norm inside the hidden layer cannot be split per unit")
        if isinstance(mlp, SwiGLU):
            w = torch.cat([mlp.fc1_g.weight, mlp.fc1_x.weight])
            b = None if mlp.fc1_g.bias is None else torch.cat([mlp.fc1_g.bias, mlp.fc1_x.bias])
            return MlpWeights(w, b, mlp.fc2.weight, mlp.fc2.bias, mlp.act, gated=True)
        if isinstance(mlp, GluMlp):
            if mlp.gate_last or getattr(mlp, "chunk_dim", -1) != -1:
                raise ModelInputError("GluMlp with gate_last=True is not supported")
            return MlpWeights(mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, mlp.act, gated=True)
        if isinstance(mlp, Mlp) and isinstance(mlp.fc1, nn.Linear):
            return MlpWeights(mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, mlp.act, gated=False)
        raise ModelInputError(f"unsupported timm MLP type {type(mlp).__name__}")

    def make_mlp(self, weights: MlpWeights) -> nn.Module:
        from timm.layers.mlp import GluMlp, Mlp

        D, H = weights.fc1_weight.shape[1], weights.hidden
        cls = GluMlp if weights.gated else Mlp
        extra = {"gate_last": False} if weights.gated else {}  # [gate; up] rows, as SwiGLUPacked / DINOv2 w12
        mlp = cls(D, H * (2 if weights.gated else 1), weights.fc2_weight.shape[0], act_layer=nn.Identity,
                  bias=weights.fc1_bias is not None, **extra)
        mlp.act = weights.act
        with torch.no_grad():
            mlp.fc1.weight.copy_(weights.fc1_weight)
            mlp.fc2.weight.copy_(weights.fc2_weight)
            if weights.fc1_bias is not None:
                mlp.fc1.bias.copy_(weights.fc1_bias)
            if weights.fc2_bias is not None:
                mlp.fc2.bias.copy_(weights.fc2_bias)
        return mlp.to(weights.fc1_weight.device, weights.fc1_weight.dtype)

    def down_proj(self, mlp: nn.Module) -> nn.Module:
        return mlp.fc2

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def set_num_prefix_tokens(self, model: nn.Module, n: int) -> None:
        _pin_pos_embed_prefix(model)
        model.num_prefix_tokens = n
        # timm keeps num_reg_tokens for bookkeeping (e.g. forward_intermediates); registers count there.
        model.num_reg_tokens = n - (1 if getattr(model, "cls_token", None) is not None else 0)

    def insertion_point(self, model: nn.Module) -> tuple[nn.Module, str]:
        return model, "norm_pre"

    def embed_dim(self, model: nn.Module) -> int:
        return int(model.embed_dim)

    def attention(self, block: nn.Module) -> AttentionParts:
        attn = block.attn
        if not hasattr(attn, "qkv") or attn.qkv is None:
            raise ModelInputError(f"unsupported attention module {type(attn).__name__}")
        D = attn.qkv.weight.shape[0] // 3
        w, b = attn.qkv.weight, attn.qkv.bias
        return AttentionParts(
            norm=block.norm1,
            q_weight=w[:D], q_bias=None if b is None else b[:D],
            k_weight=w[D:2 * D], k_bias=None if b is None else b[D:2 * D],
            num_heads=attn.num_heads,
            q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
        )

    def patch_embed(self, model: nn.Module) -> nn.Conv2d:
        return model.patch_embed.proj

    def forward_tokens(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return model.forward_features(pixels)

    def forward_pooled(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(pixels))

    def forward_both(self, model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = model.forward_features(pixels)
        return model.forward_head(tokens), tokens

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        cfg = self._data_config(model)
        return tuple(cfg["input_size"])  # type: ignore[return-value]

    def _data_config(self, model: nn.Module) -> dict:
        import math

        import timm.data

        cfg = timm.data.resolve_data_config({}, model=model)
        for key in ("mean", "std"):  # from the source's config.json: a user error when not numbers
            v = cfg.get(key)
            seq = v if isinstance(v, (list, tuple)) else [v]
            if v is not None and not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                         for x in seq):
                raise ModelInputError(f"the model's pretrained_cfg {key} must be numbers, got {v!r}")
        return cfg

    def data_transform(self, model: nn.Module) -> Callable:
        import timm.data

        return timm.data.create_transform(**self._data_config(model), is_training=False)


class _ResizePrefixPinned:
    """Mixin for every baked timm ViT: `set_input_size` resamples `pos_embed` with the source's prefix count.

    timm resamples the positional table using `num_prefix_tokens` as the number of leading rows that have
    no grid position; test-time registers raise that count (pooling and slicing must skip them) but have
    no positional rows, so the split must keep the count the table was made with.
    """


    def set_input_size(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        n = self.num_prefix_tokens
        self.num_prefix_tokens = self.surgery_pos_embed_prefix
        try:
            return super().set_input_size(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.num_prefix_tokens = n


class _PosEmbedPrefixPinned(_ResizePrefixPinned):
    """For dynamic_img_size models also the resampling timm does in every forward (`_pos_embed`)."""

    def _pos_embed(self, x):  # type: ignore[no-untyped-def]
        n = self.num_prefix_tokens
        self.num_prefix_tokens = self.surgery_pos_embed_prefix
        try:
            return super()._pos_embed(x)  # type: ignore[misc]
        finally:
            self.num_prefix_tokens = n


_PINNED_CLASSES: dict[tuple[type, type], type] = {}


def _pin_pos_embed_prefix(model: nn.Module) -> None:
    """Keep the positional table's prefix count for resizing (and, dynamic_img_size, every forward)."""
    if isinstance(model, _ResizePrefixPinned):
        return
    cls = type(model)
    dynamic = getattr(model, "dynamic_img_size", False) and not getattr(model, "no_embed_class", False)
    mixin = _PosEmbedPrefixPinned if dynamic else _ResizePrefixPinned
    if (cls, mixin) not in _PINNED_CLASSES:
        _PINNED_CLASSES[cls, mixin] = type(cls.__name__, (mixin, cls), {"__module__": cls.__module__})
    model.surgery_pos_embed_prefix = int(model.num_prefix_tokens)
    # A class swap, not instance patching: `_pos_embed` is looked up on the class by timm's forward paths,
    # and the model must stay an instance of its timm class (isinstance checks, deepcopy, export tracing).
    model.__class__ = _PINNED_CLASSES[cls, mixin]


TIMM = TimmViT()
