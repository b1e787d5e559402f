"""What the fix does to a model: high-norm outliers and attention sinks, measured on the same images."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .discovery import AUTO_FACTOR, outlier_mask
from .families import Family, family_for


@torch.inference_mode()
def token_diagnostics(model: nn.Module, pixels: torch.Tensor, *, family: Family | None = None,
                      register_positions: list[int] | None = None) -> dict[str, torch.Tensor]:
    """One forward pass; returns per-block token norms [L, B, N] and last-block attention [B, heads, N, N]."""
    fam = family or family_for(model)
    blocks = fam.blocks(model)
    norms: list[torch.Tensor] = []
    last_in: list[torch.Tensor] = []
    hs = [b.register_forward_hook(lambda _m, _a, o: norms.append(fam.block_output(o).float().norm(dim=-1)))
          for b in blocks]
    hs.append(blocks[-1].register_forward_pre_hook(lambda _m, a: last_in.append(a[0])))
    try:
        pooled, _ = fam.forward_both(model, pixels)
    finally:
        for h in hs:
            h.remove()
    attn = fam.attention(blocks[-1]).probs(last_in[0].float() if last_in[0].dtype != torch.float32 else last_in[0])
    return {"norms": torch.stack(norms), "attn": attn, "pooled": pooled}


def effect_metrics(diag: dict[str, torch.Tensor], num_prefix: int, register_positions: list[int],
                   detect_layer: int = -1, threshold: float | str = "auto", top_share: float = 0.01) -> dict[str, Any]:
    """Outlier share, max/median patch norm, CLS attention mass on the top tokens, register attention mass.

    `num_prefix` counts the tokens before the patches (registers included for a baked model);
    `register_positions` are the test-time register indices (empty for the original model).
    """
    norms = diag["norms"][detect_layer]  # [B, N]
    B, N = norms.shape
    patch = norms[:, num_prefix:]
    mask, _ = outlier_mask(norms, num_prefix, threshold, include_prefix=False)
    original_prefix = num_prefix - len(register_positions)
    if original_prefix > 0:  # the CLS token's attention, averaged over heads
        cls_attn = diag["attn"][:, :, 0, :].mean(1)  # [B, N]
    else:  # no CLS (attention-pool models): the patches' average attention
        cls_attn = diag["attn"][:, :, num_prefix:, :].mean(dim=(1, 2))
    patch_attn = cls_attn[:, num_prefix:]
    k = max(1, int(round(top_share * patch_attn.shape[1])))
    top_mass = patch_attn.topk(k, dim=1).values.sum(1)
    ent = -(cls_attn.clamp_min(1e-12) * cls_attn.clamp_min(1e-12).log()).sum(1)
    out = {
        "outlier_share": float(mask[:, num_prefix:].float().mean()),
        "max_over_median_patch_norm": float((patch.max(1).values / patch.median(1).values).mean()),
        "max_patch_norm": float(patch.max(1).values.mean()),
        "median_patch_norm": float(patch.median(1).values.mean()),
        "cls_attention_top_patch_mass": float(top_mass.mean()),
        "cls_attention_top_patch_share": top_share,
        "cls_attention_entropy": float(ent.mean()),
        "cls_attention_register_mass": float(cls_attn[:, register_positions].sum(1).mean()) if register_positions else 0.0,
        "register_norm": float(norms[:, register_positions].mean()) if register_positions else None,
        "threshold_rule": f"auto ({AUTO_FACTOR} x median)" if threshold == "auto" else float(threshold),
    }
    return out
