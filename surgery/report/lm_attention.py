"""`inspect` on a vision-language model: the language model's attention from the last text token to the
image tokens, original against baked (what the paper shows for LLaVA: an artifact token soaks up the
answer token's attention; with the test-time register the attention spreads over the image again).

Measured on the judged prompt (the image's placeholders, then a fixed text; the adapter's
`forward_features_and_logits`) with eager attention: per image, the last token's attention row over the
image tokens, averaged over heads and over the language model's layers. Numbers: the share of that
row on the image tokens, and the share of the image attention held by the top 1 % of image tokens
(at least one). The map shows the attention over the base image's grid (the first grid x grid image
tokens after a CLS feature, when the VLM keeps one).
"""
from __future__ import annotations

import contextlib
import os
import math
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn

from ..core.images import ImageBatches

TOP_SHARE = 0.01


def is_vlm(adapter: Any) -> bool:
    return hasattr(adapter, "forward_features_and_logits")


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Attention probabilities are only returned by the eager kernels."""
    before = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before is not None:
            model.set_attn_implementation(before)


def _grid_rows(adapter: Any, model: nn.Module, n_image: int) -> tuple[int, int]:
    """(first image token of the base grid, grid side) for the map."""
    vision = model.config.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    first = n_image - side * side if n_image == side * side + 1 else 0  # `full` with CLS: the CLS feature first
    return first, side


@torch.inference_mode()
def image_attention(adapter: Any, model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(last token's attention over image tokens [B, n_image], share of its row on them [B])."""
    with eager_attention(model):
        _, out = adapter.forward_features_and_logits(model, pixels, all_images=True, output_attentions=True)
    att = torch.stack([a.float() for a in out.attentions]).mean(dim=(0, 2))[:, -1]  # [B, T]: layers, heads
    image = att[:, : att.shape[1] - adapter.text_length]  # the prompt: image tokens, then the text
    return image, image.sum(dim=1)


def attention_bytes(adapter: Any, model: nn.Module, pixels_shape: tuple[int, ...], batch: int) -> int:
    """The language model's attention probabilities a batch returns (float32, every layer and head, the
    judged prompt's tokens squared), plus one streamed unit of a language model kept in its files."""
    text = model.config.text_config
    tokens = adapter.image_token_count(model, torch.empty(pixels_shape[-3:], device="meta"))
    squares = [int(a) for a, b in (getattr(model.config, "image_grid_pinpoints", None) or []) if a == b]
    if squares:  # any-resolution tiles: the whole image plus the grid's tiles (an upper bound)
        tokens *= 1 + (max(squares) // int(pixels_shape[-1])) ** 2
    tokens += adapter.text_length
    heads, layers = int(text.num_attention_heads), int(text.num_hidden_layers)
    return 4 * batch * layers * heads * tokens * tokens * 2  # the probabilities and the scores they came from


def require_lm_attention_fits(pair: Any, batch_size: int) -> None:
    """Refuse (exit 13) before measuring when a batch's language-model attention cannot fit in memory."""
    from ..core.errors import OutOfMemoryRisk
    from ..core.memory import GiB, available_bytes

    loaded = pair.original
    if not is_vlm(loaded.adapter) or os.environ.get("VIT_SURGERY_SKIP_MEMORY_CHECK"):
        return
    c, h, w = loaded.adapter.input_size(loaded.model)
    need = attention_bytes(loaded.adapter, loaded.model, (c, h, w), batch_size)
    avail = available_bytes()
    if avail is not None and need > avail:
        raise OutOfMemoryRisk(f"the language model's attention to the image tokens would hold about {need / GiB:.1f} "
                              f"GiB per batch of {batch_size} ({avail / GiB:.1f} GiB is available): stopped before "
                              "measuring; options: {no_lm_attention} (the rest of the report), or {batch_size} 1",
                              parameters=("no_lm_attention", "batch_size"))


def top_share(image: torch.Tensor) -> torch.Tensor:
    """Share of each row's image attention held by its top 1 % of image tokens (at least one)."""
    k = max(1, math.ceil(TOP_SHARE * image.shape[1]))
    return image.topk(k, dim=1).values.sum(1) / image.sum(1).clamp_min(1e-30)


def measure_lm_attention(pair: Any, files: list[Path], *, batch_size: int, show: int,
                         progress: bool) -> dict[str, Any]:
    """{'original'|'baked': {'image_attention_share', 'top1pct_image_attention_share'}, 'maps': ...}."""
    sides = {"original": pair.original}
    if pair.baked is not None:
        sides["baked"] = pair.baked
    sums: dict[str, dict[str, list[float]]] = {k: {"share": [], "top": []} for k in sides}
    maps: dict[str, list[np.ndarray]] = {k: [] for k in sides}
    for pixels, _paths in ImageBatches(files, pair.original.transform, batch_size, progress=progress, desc="LM attention"):
        for name, loaded in sides.items():
            model = loaded.model
            x = pixels.to(next(model.parameters()).device, next(model.parameters()).dtype)
            image, share = image_attention(loaded.adapter, model, x)
            sums[name]["share"] += share.tolist()
            sums[name]["top"] += top_share(image).tolist()
            first, side = _grid_rows(loaded.adapter, model, image.shape[1])
            for row in image[: max(0, show - len(maps[name]))]:
                grid = row[first:first + side * side]
                if grid.numel() == side * side:
                    maps[name].append(grid.reshape(side, side).cpu().numpy())
    out: dict[str, Any] = {
        side: {"image_attention_share": float(np.mean(v["share"])) if v["share"] else None,
               "top1pct_image_attention_share": float(np.mean(v["top"])) if v["top"] else None}
        for side, v in sums.items()}
    out["definition"] = ("last text token's attention over the image tokens, mean over heads and language-model "
                         "layers; share on image tokens, and share of that held by the top 1 % of image tokens")
    out["_maps"] = maps
    return out


def plot_lm_attention(result: dict[str, Any], path: Path) -> Optional[bytes]:
    """Maps of the last token's attention over the base image grid, original (top) and baked (bottom)."""
    maps = result.get("_maps") or {}
    rows = [k for k in ("original", "baked") if maps.get(k)]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(maps[k]) for k in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.3 * len(rows)), squeeze=False)
    for r, side in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(maps[side]):
                ax.imshow(maps[side][c], cmap="viridis")
                ax.set_title(f"{side} {c}", fontsize=8)
    fig.suptitle("Language model: last text token's attention over the image tokens", fontsize=9)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    data = buf.getvalue()
    path.write_bytes(data)
    return data
