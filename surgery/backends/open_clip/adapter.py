"""open_clip `VisionTransformer` (the image tower `model.visual` of CLIP / CustomTextCLIP / CoCa).

Structure: `transformer.resblocks[i].mlp.{c_fc, gelu, c_proj}` (nn.Sequential), attention in
`attn` (`nn.MultiheadAttention`, batch_first, packed `in_proj_weight`; or open_clip's own
`Attention` for custom blocks), the pre-norm `ln_pre`, one prefix token (`class_embedding`, always
present in open_clip's VisionTransformer), final norm `ln_post`, projection `proj`.

Registers go in front of `ln_pre` (after the positional embedding), right after the class token.
open_clip's pooling (`_pool` / `_global_pool`, `forward_intermediates`) assumes exactly one prefix
token, so `set_num_prefix_tokens` switches the tower to `RegisteredVisionTransformer`, a subclass
that drops the register rows before pooling: 'tok' still pools the class token, 'avg' averages the
patches only, 'none' / `output_tokens` return the original token layout, attention-pool heads
(CoCa) read the same tokens as before. Every other method is open_clip's own.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ...core.errors import ModelInputError
from ...core.modules import MlpWeights, RegisterMlp
from ...core.adapter import AttentionParts, Adapter

try:  # open_clip is a hard dependency, but keep `import surgery` working without it
    from open_clip.transformer import VisionTransformer as _OpenClipViT
except Exception:  # pragma: no cover
    _OpenClipViT = None  # type: ignore[assignment,misc]


def _strip_registers(x: torch.Tensor, num_registers: int) -> torch.Tensor:
    """[B, 1 + R + P, D] -> [B, 1 + P, D]: the token layout open_clip's own code expects."""
    if num_registers <= 0:
        return x
    return torch.cat([x[:, :1], x[:, 1 + num_registers:]], dim=1)


class _RegisterPooling:
    """Mixin for open_clip's VisionTransformer: pooling and intermediates skip test-time registers.

    `num_prefix_tokens` (instance attribute, 1 + R) says how many tokens precede the patches.
    """

    num_prefix_tokens: int = 1

    @property
    def num_test_time_registers(self) -> int:
        return int(self.num_prefix_tokens) - 1

    def _pool(self, x: torch.Tensor):  # type: ignore[override]
        return super()._pool(_strip_registers(x, self.num_test_time_registers))  # type: ignore[misc]

    def forward_intermediates(self, x: torch.Tensor, indices=None, stop_early: bool = False,  # type: ignore[override]
                              normalize_intermediates: bool = False, intermediates_only: bool = False,
                              output_fmt: str = 'NCHW', output_extra_tokens: bool = False):
        r = self.num_test_time_registers
        B, _, height, width = x.shape
        out = super().forward_intermediates(  # type: ignore[misc]
            x, indices=indices, stop_early=stop_early, normalize_intermediates=normalize_intermediates,
            intermediates_only=intermediates_only, output_fmt='NLC', output_extra_tokens=True)
        inter = [y[:, r:] for y in out['image_intermediates']]  # open_clip sliced off the class token only
        if output_fmt == 'NCHW':
            H, W = height // self.patch_size[0], width // self.patch_size[1]  # type: ignore[attr-defined]
            inter = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in inter]
        out['image_intermediates'] = inter
        if not output_extra_tokens:
            out.pop('image_intermediates_prefix', None)
        return out


if _OpenClipViT is not None:
    class RegisteredVisionTransformer(_RegisterPooling, _OpenClipViT):  # type: ignore[misc,valid-type]
        """open_clip VisionTransformer carrying test-time registers (set by the open_clip family)."""
else:  # pragma: no cover
    RegisteredVisionTransformer = None  # type: ignore[assignment,misc]

_REGISTERED_CLASSES: dict[type, type] = {}


def _registered_class(base: type) -> type:
    if _OpenClipViT is not None and base is _OpenClipViT:
        return RegisteredVisionTransformer  # type: ignore[return-value]
    if base not in _REGISTERED_CLASSES:
        _REGISTERED_CLASSES[base] = type(f"Registered{base.__name__}", (_RegisterPooling, base), {})
    return _REGISTERED_CLASSES[base]


def _base_class(cls: type) -> type:
    if issubclass(cls, _RegisterPooling):
        return next(c for c in cls.__mro__[1:] if not issubclass(c, _RegisterPooling))
    return cls


def unsupported_reason(visual: nn.Module) -> Optional[str]:
    """Why this open_clip image tower cannot be baked exactly, or None when it can."""
    tr = getattr(visual, "transformer", None)
    if tr is None or not hasattr(tr, "resblocks"):
        return "it has no transformer.resblocks"
    if getattr(tr, "batch_first", True) is not True:
        return "its transformer runs sequence-first (batch_first=False); only batch-first towers are supported"
    for i, blk in enumerate(tr.resblocks):
        mlp = blk.mlp
        if isinstance(mlp, RegisterMlp):
            continue
        if not (isinstance(mlp, nn.Sequential) and hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj")):
            return f"block {i} has an MLP of type {type(mlp).__name__} (expected Sequential c_fc/gelu/c_proj)"
        ln = getattr(mlp, "ln", None)
        if ln is not None and not isinstance(ln, nn.Identity):
            return (f"block {i}'s MLP normalises its hidden layer (scale_fc=True, NormFormer): the LayerNorm mixes "
                    "all hidden units, so register neurons cannot be split off exactly")
    return None


class OpenClipViT(Adapter):
    name = "open_clip"

    def matches(self, model: nn.Module) -> bool:
        return _OpenClipViT is not None and isinstance(model, _OpenClipViT)

    # --- blocks and MLPs -------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        why = unsupported_reason(model)
        if why:
            raise ModelInputError(f"unsupported open_clip image tower: {why}")
        return list(model.transformer.resblocks)

    def mlp_weights(self, mlp: nn.Module) -> MlpWeights:
        if isinstance(mlp, RegisterMlp):
            return mlp.merged_weights()
        if not (isinstance(mlp, nn.Sequential) and hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj")):
            raise ModelInputError(f"unsupported open_clip MLP type {type(mlp).__name__}")
        ln = getattr(mlp, "ln", None)
        if ln is not None and not isinstance(ln, nn.Identity):
            raise ModelInputError("open_clip MLPs with a LayerNorm inside the hidden layer (scale_fc=True) "
                                  "cannot be split per unit")
        return MlpWeights(mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias, mlp.gelu, gated=False)

    def make_mlp(self, weights: MlpWeights) -> nn.Module:
        if weights.gated:
            raise ModelInputError("open_clip MLPs are never gated")
        D, H, O = weights.fc1_weight.shape[1], weights.hidden, weights.fc2_weight.shape[0]
        ref = weights.fc1_weight
        c_fc = nn.Linear(D, H, bias=weights.fc1_bias is not None, device=ref.device, dtype=ref.dtype)
        c_proj = nn.Linear(H, O, bias=weights.fc2_bias is not None, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            c_fc.weight.copy_(weights.fc1_weight)
            c_proj.weight.copy_(weights.fc2_weight)
            if weights.fc1_bias is not None:
                c_fc.bias.copy_(weights.fc1_bias)
            if weights.fc2_bias is not None:
                c_proj.bias.copy_(weights.fc2_bias)
        return nn.Sequential(OrderedDict([("c_fc", c_fc), ("gelu", weights.act), ("c_proj", c_proj)]))

    def down_proj(self, mlp: nn.Module) -> nn.Module:
        return mlp.fc2 if isinstance(mlp, RegisterMlp) else mlp.c_proj

    # --- token layout ----------------------------------------------------------------------
    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(getattr(model, "num_prefix_tokens", 1))

    def set_num_prefix_tokens(self, model: nn.Module, n: int) -> None:
        if n < 1:
            raise ValueError("an open_clip VisionTransformer always has its class token")
        base = _base_class(type(model))
        # A class swap, not instance patching: open_clip's forward calls `self._pool` / `forward_intermediates`
        # and the model must stay an open_clip VisionTransformer (isinstance checks, deepcopy, export tracing).
        model.__class__ = _registered_class(base) if n > 1 else base
        if n > 1:
            model.num_prefix_tokens = int(n)
        elif "num_prefix_tokens" in model.__dict__:
            del model.num_prefix_tokens

    def insertion_point(self, model: nn.Module) -> tuple[nn.Module, str]:
        return model, "ln_pre"

    def embed_dim(self, model: nn.Module) -> int:
        return int(model.conv1.out_channels)

    def attention(self, block: nn.Module) -> AttentionParts:
        attn = block.attn
        w = getattr(attn, "in_proj_weight", None)
        if w is None:
            raise ModelInputError(f"unsupported attention module {type(attn).__name__} (no packed in_proj_weight)")
        if getattr(attn, "logit_scale", None) is not None:
            raise ModelInputError("scaled cosine attention is not supported for attention diagnostics")
        if isinstance(attn, nn.MultiheadAttention) and not attn.batch_first:
            raise ModelInputError("nn.MultiheadAttention with batch_first=False is not supported")
        D = w.shape[0] // 3
        b = getattr(attn, "in_proj_bias", None)
        q_norm = getattr(attn, "ln_q", None)
        k_norm = getattr(attn, "ln_k", None)
        return AttentionParts(
            norm=block.ln_1,
            q_weight=w[:D], q_bias=None if b is None else b[:D],
            k_weight=w[D:2 * D], k_bias=None if b is None else b[D:2 * D],
            num_heads=int(attn.num_heads),
            q_norm=None if isinstance(q_norm, nn.Identity) else q_norm,
            k_norm=None if isinstance(k_norm, nn.Identity) else k_norm,
        )

    def patch_embed(self, model: nn.Module) -> nn.Conv2d:
        return model.conv1

    # --- running the model -----------------------------------------------------------------
    def _final_tokens(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if model.attn_pool is not None:  # ln_post acts on the pooled queries there; tokens are the raw stream
            return x
        return model.ln_post(x)

    def forward_both(self, model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(visual(pixels), final tokens): the pooled output is exactly open_clip's encode_image
        (before the optional normalisation); tokens are ln_post of the last block's output, all rows."""
        stream: list[torch.Tensor] = []
        h = model.transformer.register_forward_hook(lambda _m, _a, out: stream.append(out))
        try:
            out = model(pixels)
        finally:
            h.remove()
        pooled = out[0] if isinstance(out, (tuple, list)) else out
        return pooled, self._final_tokens(model, stream[-1])

    def forward_tokens(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        x = model.transformer(model._embeds(pixels))
        return self._final_tokens(model, x)

    def forward_pooled(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        out = model(pixels)
        return out[0] if isinstance(out, (tuple, list)) else out

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        h, w = model.image_size
        return (3, int(h), int(w))

    def preprocess_cfg(self, model: nn.Module) -> dict[str, Any]:
        from open_clip.model import get_model_preprocess_cfg

        cfg = dict(get_model_preprocess_cfg(model) or {})
        cfg.setdefault("size", tuple(model.image_size))
        return cfg

    def data_transform(self, model: nn.Module) -> Callable:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        cfg = self.preprocess_cfg(model)
        known = set(PreprocessCfg.__dataclass_fields__)
        return image_transform_v2(PreprocessCfg(**{k: v for k, v in cfg.items() if k in known}), is_train=False)


OPEN_CLIP = OpenClipViT()
