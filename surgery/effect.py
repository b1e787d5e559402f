"""What the fix does to a model: high-norm outliers and attention sinks, measured on the same images."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from .discovery import AUTO_FACTOR, outlier_mask
from .families import Family, family_for


@torch.inference_mode()
def token_diagnostics(model: nn.Module, pixels: torch.Tensor, *,
                      family: Family | None = None) -> dict[str, torch.Tensor]:
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


def cls_attention(attn: torch.Tensor, num_prefix: int, original_prefix: int) -> torch.Tensor:
    """[B, N] from attention probabilities [B, heads, N, N]: the CLS token's row averaged over heads, or
    (no CLS: attention-pool models) the patches' rows averaged."""
    if original_prefix > 0:
        return attn[:, :, 0, :].mean(1)
    return attn[:, :, num_prefix:, :].mean(dim=(1, 2))


@contextlib.contextmanager
def last_block_diagnostics(model: nn.Module, fam: Family, num_registers: int,
                           sink: dict[str, list[torch.Tensor]]) -> Iterator[None]:
    """Hooks for the effect statistics, placed around a forward pass the caller runs anyway: the last
    block's output norms and the CLS attention row, recomputed in float32 from the block's input one
    image at a time (never the [B, heads, N, N] tensor of the whole batch). Appends to
    sink["norms"] ([B, N]) and sink["cls_attn"] ([B, N])."""
    from .cast import cast_module

    block = fam.blocks(model)[-1]
    p = fam.num_prefix_tokens(model)  # read inside the pass's context: registers included

    def before(_m: nn.Module, args: tuple) -> None:
        x = args[0]
        with cast_module(block, torch.float32):
            parts = fam.attention(block)
            rows = [cls_attention(parts.probs(x[i:i + 1].float()), p, p - num_registers) for i in range(x.shape[0])]
        sink.setdefault("cls_attn", []).append(torch.cat(rows).cpu())

    def after(_m: nn.Module, _a: tuple, out: object) -> None:
        sink.setdefault("norms", []).append(fam.block_output(out).float().norm(dim=-1).cpu())

    hs = [block.register_forward_pre_hook(before), block.register_forward_hook(after)]
    try:
        yield
    finally:
        for h in hs:
            h.remove()


def collected(sink: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The diagnostics `effect_metrics` reads, from what `last_block_diagnostics` collected."""
    return {"norms": torch.cat(sink["norms"])[None], "cls_attn": torch.cat(sink["cls_attn"])}


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
    cls_attn = diag["cls_attn"] if "cls_attn" in diag else cls_attention(diag["attn"], num_prefix, original_prefix)
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
