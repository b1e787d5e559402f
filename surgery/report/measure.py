"""Measuring both models on the same images: per-block token-norm traces, outlier profile, patch-norm and
attention maps of the shown images, effect metrics, pooled-output cosine."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..core.bake import register_token_indices
from ..core.discovery import AUTO_FACTOR, emergence_layer, outlier_mask
from ..core.effect import cls_attention, effect_metrics, token_diagnostics
from ..core.errors import ParameterError
from ..core.images import ImageBatches
from ..core.source import LoadedModel

from .pair import Pair

DEFAULT_SHOW = 6  # images drawn in the norm and attention maps


# ---- measuring --------------------------------------------------------------------------------

def _grid(loaded: LoadedModel, model: torch.nn.Module, n_patches: int) -> tuple[int, int]:
    try:
        _, H, W = loaded.adapter.input_size(model)
        kh, kw = loaded.adapter.patch_embed(model).kernel_size
        if (H // kh) * (W // kw) == n_patches:
            return H // kh, W // kw
    except Exception:
        pass
    s = int(round(math.sqrt(n_patches)))
    return (s, s) if s * s == n_patches else (1, n_patches)


def _normalize_stats(transform: Any) -> Optional[tuple[np.ndarray, np.ndarray]]:
    for t in getattr(transform, "transforms", []) or []:
        if hasattr(t, "mean") and hasattr(t, "std"):
            return np.asarray(t.mean, dtype=np.float64).reshape(3, 1, 1), np.asarray(t.std, dtype=np.float64).reshape(3, 1, 1)
    return None


def _display_pixels(x: torch.Tensor, stats: Optional[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    if x.dim() == 4:  # any-resolution tiles (LLaVA-NeXT / OneVision): tile 0 is the whole image
        x = x[0]
    a = x.detach().float().cpu().numpy().astype(np.float64)
    if stats is not None:
        a = a * stats[1] + stats[0]
    else:
        a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
    return np.clip(a.transpose(1, 2, 0), 0.0, 1.0)


class _Mean:
    """Weighted running mean of flat metric dicts (None and text values are kept from the first batch)."""

    def __init__(self) -> None:
        self.sum: dict[str, float] = {}
        self.n = 0
        self.other: dict[str, Any] = {}

    def add(self, d: dict[str, Any], w: int) -> None:
        for k, v in d.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.sum[k] = self.sum.get(k, 0.0) + float(v) * w
            else:
                self.other.setdefault(k, v)
        self.n += w

    def result(self) -> dict[str, Any]:
        out = dict(self.other)
        out.update({k: v / max(self.n, 1) for k, v in self.sum.items()})
        return out


@dataclass
class SideTrace:
    median: list[float]
    p99: list[float]
    max: list[float]
    register: Optional[list[float]] = None


def _layer_stats(norms: torch.Tensor, p: int) -> torch.Tensor:
    """[L, B, N] -> per layer and image: median, p99, max of patch-token norms [L, B, 3]."""
    patch = norms[:, :, p:].float()
    q = torch.quantile(patch, torch.tensor([0.5, 0.99], device=patch.device), dim=2)  # [2, L, B]
    return torch.stack([q[0], q[1], patch.max(2).values], dim=-1)


@dataclass
class Measurement:
    images: list[str]
    metrics: dict[str, dict[str, Any]]
    trace: dict[str, SideTrace]
    outlier_ratio: list[float]  # original: mean norm / median at detect-layer outlier positions, per layer
    emergence: Optional[int]  # first block where the eventual outlier positions already break the outlier rule
    peak_from: Optional[int]  # first block where they reach 90 % of their peak norm ratio (discovery's max-layer rule)
    outlier_norm: list[float]  # original: mean norm at detect-layer outlier positions, per block
    cosine: list[float]
    show: list[dict[str, Any]]  # per shown image: name, pixels, norms/attn per side, outlier mask
    grid: tuple[int, int]
    detect_layer: int
    depth: int
    skipped: int
    threshold: float | str = "auto"
    has_cls: bool = True  # False: attention rows are the patches' mean attention (attention-pool models)


class _Sums:
    """What `measure` accumulates over the batches, per side ("original", "baked") where it differs."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.means = {"original": _Mean(), "baked": _Mean()}
        self.layer_sum = {side: torch.zeros(depth, 3, dtype=torch.float64) for side in self.means}  # median, p99, max
        self.reg_sum = torch.zeros(depth, dtype=torch.float64)  # baked: register token norm per block
        self.ratio_sum = torch.zeros(depth, dtype=torch.float64)  # original: outlier norm / median per block
        self.onorm_sum = torch.zeros(depth, dtype=torch.float64)  # original: outlier norm per block
        self.with_outliers = 0
        self.cosine: list[float] = []
        self.names: list[str] = []
        self.shown: list[dict[str, Any]] = []
        self.grid: Optional[tuple[int, int]] = None


def _measure_side(sums: _Sums, name: str, d: dict[str, torch.Tensor], p: int, r: list[int], det: int,
                  threshold: float | str) -> dict[str, Any]:
    """Fold one side's diagnostics of one batch into `sums`; returns its per-image maps."""
    m = effect_metrics(d, p, r, detect_layer=det, threshold=threshold)
    if not r:  # no test-time register on this side: nothing to measure there
        m["cls_attention_register_mass"] = None
    cls = cls_attention(d["attn"].float(), p, p - len(r))  # [B, N]; no CLS: the patches' mean row
    patch_attn = cls[:, p:] / cls[:, p:].sum(1, keepdim=True).clamp_min(1e-12)
    m["cls_patch_attention_entropy"] = float(
        -(patch_attn.clamp_min(1e-12) * patch_attn.clamp_min(1e-12).log()).sum(1).mean())
    sums.means[name].add(m, cls.shape[0])
    sums.layer_sum[name] += _layer_stats(d["norms"], p).sum(1).double().cpu()
    if r:
        sums.reg_sum += d["norms"][:, :, r].float().mean(2).sum(1).double().cpu()
    mask, _ = outlier_mask(d["norms"][det], p, threshold, include_prefix=False)
    if name == "original":
        _add_outlier_profile(sums, d["norms"], mask, p)
    return {"norms": d["norms"][det][:, p:].float().cpu(), "attn": cls[:, p:].cpu(),
            "mask": mask[:, p:].cpu(), "pooled": d["pooled"].float().cpu(),
            "register_attn": cls[:, r].sum(1).cpu() if r else None}


def _add_outlier_profile(sums: _Sums, norms: torch.Tensor, mask: torch.Tensor, p: int) -> None:
    """Where outliers appear: at the detect layer's outlier positions, their norm and norm / the layer
    median, per block, summed over the images that have outliers."""
    has = mask.any(1)
    if has.any():
        n = norms.float()  # [L, B, N]
        med = n[:, :, p:].median(2).values  # [L, B]
        out_mean = (n * mask).sum(2) / mask.sum(1).clamp(min=1)  # [L, B]
        sums.ratio_sum += (out_mean / med)[:, has].sum(1).double().cpu()
        sums.onorm_sum += out_mean[:, has].sum(1).double().cpu()
        sums.with_outliers += int(has.sum())


def _keep_shown(sums: _Sums, paths: list[Any], pixels: torch.Tensor, per_image: dict[str, dict[str, Any]],
                show: int, stats_px: Optional[tuple[np.ndarray, np.ndarray]]) -> None:
    """Record the batch's image names, and the maps of the first `show` images for the figures. A tiling VLM
    (LLaVA-NeXT / OneVision) gives the tower `tiles` images per image, tile 0 the whole image: its maps."""
    for i, path in enumerate(paths):
        sums.names.append(Path(path).name)
        if len(sums.shown) < show:
            item = {"name": Path(path).name, "pixels": _display_pixels(pixels[i], stats_px)}
            for name, d in per_image.items():
                j = i * (d["norms"].shape[0] // len(paths))
                item[name] = {"norms": d["norms"][j].numpy(), "attn": d["attn"][j].numpy(),
                              "mask": d["mask"][j].numpy(),
                              "register_attn": None if d["register_attn"] is None else float(d["register_attn"][j])}
            sums.shown.append(item)


def _detect_block(detect_layer: Optional[int], depth: int) -> int:
    det = depth - 1 if detect_layer is None else (detect_layer + depth if detect_layer < 0 else detect_layer)
    if not 0 <= det < depth:
        raise ParameterError(f"{{detect_layer}} {detect_layer} out of range (model has {depth} blocks)", "detect_layer")
    return det


@torch.inference_mode()
def measure(pair: Pair, files: list[Path], *, detect_layer: Optional[int], threshold: float | str, batch_size: int,
            show: int, progress: bool) -> Measurement:
    fam = pair.original.adapter
    orig = pair.original.model
    baked = pair.baked.model if pair.baked is not None else None
    depth = len(fam.blocks(orig))
    det = _detect_block(detect_layer, depth)
    p_o = fam.num_prefix_tokens(orig)
    p_b = fam.num_prefix_tokens(baked) if baked is not None else 0
    regs = register_token_indices(baked, adapter=fam) if baked is not None else []
    device = next(orig.parameters()).device
    dtype = next(orig.parameters()).dtype
    stats_px = _normalize_stats(pair.original.transform)
    sums = _Sums(depth)
    batches = ImageBatches(files, pair.original.transform, batch_size, progress=progress, desc="inspecting")
    for pixels, paths in batches:
        x = pixels.to(device=device, dtype=dtype)
        sides = {"original": (token_diagnostics(orig, x, adapter=fam), p_o, [])}
        if baked is not None:
            sides["baked"] = (token_diagnostics(baked, x, adapter=fam), p_b, regs)
        per_image = {name: _measure_side(sums, name, d, p, r, det, threshold) for name, (d, p, r) in sides.items()}
        if sums.grid is None:
            sums.grid = _grid(pair.original, orig, per_image["original"]["norms"].shape[1])
        if baked is not None:
            sums.cosine += torch.nn.functional.cosine_similarity(  # a VLM's "pooled" output: its logits [B, T, V]
                per_image["original"]["pooled"].double().flatten(1), per_image["baked"]["pooled"].double().flatten(1),
                dim=1).tolist()
        _keep_shown(sums, paths, pixels, per_image, show, stats_px)
    batches.require_some(len(sums.names))
    return _measurement(sums, det, threshold, regs, skipped=len(batches.skipped), has_cls=p_o > 0)


def _measurement(sums: _Sums, det: int, threshold: float | str, regs: list[int], *, skipped: int,
                 has_cls: bool) -> Measurement:
    """Means over the images from the accumulated sums, and where the outliers emerge."""
    n = len(sums.names)
    trace = {}
    for name in sums.means:
        if sums.means[name].n == 0:
            continue
        avg = (sums.layer_sum[name] / n).numpy()
        trace[name] = SideTrace(avg[:, 0].tolist(), avg[:, 1].tolist(), avg[:, 2].tolist(),
                                (sums.reg_sum / n).tolist() if name == "baked" and regs else None)
    ratio = (sums.ratio_sum / max(sums.with_outliers, 1)).tolist()
    onorm = (sums.onorm_sum / max(sums.with_outliers, 1)).tolist()
    emergence = peak = None
    if sums.with_outliers:
        peak = emergence_layer([{"outlier_ratio": r} for r in ratio], det)
        if threshold == "auto":
            over = [i for i in range(det + 1) if ratio[i] > AUTO_FACTOR]
        else:
            over = [i for i in range(det + 1) if onorm[i] > float(threshold)]
        emergence = over[0] if over else peak
    metrics = {name: mm.result() for name, mm in sums.means.items() if mm.n}
    return Measurement(images=sums.names, metrics=metrics, trace=trace, outlier_ratio=ratio, emergence=emergence,
                       peak_from=peak, outlier_norm=onorm if sums.with_outliers else [],
                       cosine=sums.cosine, show=sums.shown, grid=sums.grid or (1, 1), detect_layer=det,
                       depth=sums.depth, skipped=skipped, threshold=threshold, has_cls=has_cls)


