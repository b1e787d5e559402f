"""Finding register neurons from calibration images.

A streaming reducer in the SmoothQuant style: each batch goes through the model once, hooks expose
each block's output norms and post-activation MLP hidden units, and only running per-(layer, unit)
sums survive the batch. Memory depends on the batch size, never on the number of images.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from .errors import NoOutliersError, ParameterError
from .adapter import Adapter
from .cast import cast_blockwise, compute_dtype
from .images import ImageBatches, list_images
from .recipe import Recipe

AUTO_FACTOR = 2.5  # auto threshold: a patch token is an outlier if its norm > AUTO_FACTOR x its image's median
SPARSITY_LEVEL = 0.5  # sparsity filter: activation below this on at least half of the image's tokens
GAP_WINDOW = 100  # automatic top-k looks for the largest score ratio among the top GAP_WINDOW units
MIN_GAP = 1.5  # ... and needs at least this ratio to trust it
GAP_SHARE = 0.5
FALLBACK_TOP_K = 10
EMERGENCE_SHARE = 0.9  # auto max-layer: first block where outliers reach 90 % of their peak norm ratio
_HIST_EDGES = np.logspace(-3, 7, 1001)


@dataclass
class DiscoveryConfig:
    detect_layer: int | None = None  # None: last block
    threshold: float | str = "auto"
    max_layer: int | str = "auto"
    top_k: int | str = "auto"
    sparsity_filter: bool = False
    include_prefix: bool = False
    batch_size: int = 8
    num_images: int | None = None
    seed: int = 0
    num_registers: int = 1
    scale: float = 1.0
    mode: str = "shared"

    def __post_init__(self) -> None:
        if isinstance(self.threshold, str) and self.threshold != "auto":
            self.threshold = _positive_float(self.threshold, "threshold")
        if isinstance(self.top_k, str) and self.top_k != "auto":
            self.top_k = int(self.top_k)
        if isinstance(self.max_layer, str) and self.max_layer != "auto":
            self.max_layer = int(self.max_layer)
        if self.batch_size < 1:
            raise ParameterError("{batch_size} must be >= 1", "batch_size")
        if isinstance(self.top_k, int) and self.top_k < 1:
            raise ParameterError("{top_k} must be >= 1 or 'auto'", "top_k")


def _positive_float(v: Any, name: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ParameterError(f"{{{name}}} must be a number or 'auto', got {v!r}", name) from None
    if not math.isfinite(f) or f <= 0:
        raise ParameterError(f"{{{name}}} must be a positive number, got {v!r}", name)
    return f


class NeuronStatistics:
    """Running sums over calibration batches: per-unit outlier scores and per-layer norm statistics."""

    def __init__(self, hidden_sizes: list[int], num_layers: int, device: torch.device) -> None:
        self.score_sum = [torch.zeros(h, dtype=torch.float64, device=device) for h in hidden_sizes]
        self.images = 0
        self.images_with_outliers = 0
        self.outlier_tokens = 0
        self.patch_tokens = 0
        self.threshold_sum = 0.0
        L = num_layers
        # per layer, summed over images: median / p99 / max patch norm, outlier-position mean norm
        self.median_sum = np.zeros(L)
        self.p99_sum = np.zeros(L)
        self.max_sum = np.zeros(L)
        self.outlier_norm_sum = np.zeros(L)  # over images with outliers
        self.outlier_ratio_sum = np.zeros(L)  # mean outlier norm / median, over images with outliers
        self.hist = np.zeros(len(_HIST_EDGES) - 1, dtype=np.int64)

    @torch.no_grad()
    def update(self, norms: list[torch.Tensor], hidden: dict[int, torch.Tensor], mask: torch.Tensor,
               thresholds: torch.Tensor, p: int, sparsity: bool) -> None:
        """norms: per block [B, N]; hidden: layer -> [B, N, H]; mask: [B, N] outlier positions."""
        B = mask.shape[0]
        counts = mask.sum(1)  # [B]
        has = counts > 0
        self.images += B
        self.images_with_outliers += int(has.sum())
        self.outlier_tokens += int(counts.sum())
        self.patch_tokens += int(norms[0][:, p:].numel())
        self.threshold_sum += float(thresholds.sum())
        b_idx, n_idx = mask.nonzero(as_tuple=True)
        inv = (1.0 / counts.clamp(min=1)).to(torch.float64)
        for layer, h in hidden.items():
            sel = h[b_idx, n_idx].abs().to(torch.float64)  # [M, H], only outlier positions
            per_image = torch.zeros(B, h.shape[-1], dtype=torch.float64, device=h.device)
            per_image.index_add_(0, b_idx, sel)
            per_image *= inv[:, None]
            if sparsity:  # keep a unit only where it is quiet on at least half of the image's tokens
                quiet = (h < SPARSITY_LEVEL).float().mean(1) >= 0.5
                per_image *= quiet
            self.score_sum[layer] += per_image.sum(0)
        for layer, n in enumerate(norms):
            patch = n[:, p:].float()
            q = torch.quantile(patch, torch.tensor([0.5, 0.99], device=patch.device), dim=1)  # [2, B]
            self.median_sum[layer] += float(q[0].sum())
            self.p99_sum[layer] += float(q[1].sum())
            self.max_sum[layer] += float(patch.max(1).values.sum())
            if has.any():
                out_mean = (n * mask).sum(1)[has] / counts[has]
                self.outlier_norm_sum[layer] += float(out_mean.sum())
                self.outlier_ratio_sum[layer] += float((out_mean / q[0][has]).sum())

    def add_histogram(self, detect_norms: torch.Tensor) -> None:
        self.hist += np.histogram(detect_norms.float().cpu().numpy().ravel(), _HIST_EDGES)[0]

    def percentile(self, q: float) -> float:
        c = np.cumsum(self.hist)
        if c[-1] == 0:
            return float("nan")
        i = int(np.searchsorted(c, q / 100.0 * c[-1]))
        return float(_HIST_EDGES[min(i + 1, len(_HIST_EDGES) - 1)])

    def layer_table(self) -> list[dict[str, float]]:
        n, k = max(self.images, 1), max(self.images_with_outliers, 1)
        return [
            {"layer": i, "median": self.median_sum[i] / n, "p99": self.p99_sum[i] / n, "max": self.max_sum[i] / n,
             "outlier_mean": self.outlier_norm_sum[i] / k if self.images_with_outliers else None,
             "outlier_ratio": self.outlier_ratio_sum[i] / k if self.images_with_outliers else None}
            for i in range(len(self.median_sum))
        ]


@dataclass
class DiscoveryResult:
    recipe: Recipe
    ranking: list[dict[str, Any]]  # top units, best first: layer, unit, score
    cut: int
    cut_rule: str
    threshold: dict[str, Any]
    detect_layer: int
    max_layer: int
    counts: dict[str, int]
    layers: list[dict[str, Any]]
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = self.recipe.to_dict()
        d.update({
            "scores": self.ranking, "selection": {"top_k": self.cut, "rule": self.cut_rule},
            "threshold": self.threshold, "detect_layer": self.detect_layer, "max_layer": self.max_layer,
            "outliers": self.counts, "layer_norms": self.layers, "provenance": self.provenance,
        })
        return d

    @property
    def fell_back(self) -> bool:
        """No clear cut-off in the scores: the top FALLBACK_TOP_K were kept (a guess, not a finding)."""
        return self.cut_rule.startswith("no score gap")

    def summary(self) -> str:
        """One line for a person: how many units were found, on how much evidence, and which; says when
        the cut was a fallback and when the evidence is thin."""
        units = ", ".join(f"{k}: {list(v)}" for k, v in self.recipe.neurons.items())
        line = (f"found {self.recipe.num_neurons} register neuron(s) in {self.counts['images_with_outliers']}/"
                f"{self.counts['images']} images with outliers -> {units}")
        if self.fell_back:
            line += (f"; WARNING: no clear cut-off in the scores ({self.cut_rule}): check the ranking in "
                     "neurons.json or pass --top-k")
        notes = evidence_notes(self.counts["images_with_outliers"], self.counts["images"])
        if notes:
            line += f"; WARNING: thin evidence: {'; '.join(notes)}"
        return line


def outlier_mask(norms: torch.Tensor, p: int, threshold: float | str, include_prefix: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Outlier positions [B, N] from detect-layer token norms, and the per-image threshold used [B]."""
    patch = norms[:, p:]
    if threshold == "auto":
        thr = AUTO_FACTOR * patch.median(dim=1).values
    else:
        thr = torch.full((norms.shape[0],), float(threshold), device=norms.device, dtype=norms.dtype)
    mask = norms > thr[:, None]
    if not include_prefix:
        mask[:, :p] = False
    return mask, thr


def select_top_k(scores: list[float], top_k: int | str) -> tuple[int, str]:
    """How many of the descending `scores` to keep: fixed K, or the largest ratio gap."""
    n = len(scores)
    if isinstance(top_k, int):
        return min(top_k, n), f"fixed top-k {top_k}"
    s = np.asarray(scores[: GAP_WINDOW + 1], dtype=np.float64)
    if len(s) < 2:
        return len(s), "all (fewer than two candidates)"
    ratios = s[:-1] / np.maximum(s[1:], 1e-12)
    best = float(ratios.max())
    if best < MIN_GAP:
        k = min(FALLBACK_TOP_K, n)
        return k, f"no score gap >= {MIN_GAP}x in the top {GAP_WINDOW}; fell back to top {k}"
    # Register neurons' scores differ among themselves (a gap can open inside the group), so cut at
    # the deepest gap that is at least half the largest one: everything above it stands out.
    k = int(np.nonzero(ratios >= max(MIN_GAP, GAP_SHARE * best))[0].max()) + 1
    return k, (f"deepest score gap >= {GAP_SHARE:g} x the largest ({best:.2f}x) in the top {GAP_WINDOW}: "
               f"unit {k} scores {ratios[k - 1]:.2f}x unit {k + 1}")


def emergence_layer(layers: list[dict[str, Any]], detect_layer: int) -> int:
    """First block whose outlier positions reach EMERGENCE_SHARE of their peak norm/median ratio."""
    ratios = [layers[i]["outlier_ratio"] or 0.0 for i in range(detect_layer + 1)]
    peak = max(ratios)
    for i, r in enumerate(ratios):
        if r >= EMERGENCE_SHARE * peak:
            return i
    return detect_layer


def layer_range(cfg: DiscoveryConfig, depth: int) -> tuple[int, int]:
    """(detect layer, last block whose units are scored) for a model of `depth` blocks."""
    detect = depth - 1 if cfg.detect_layer is None else int(cfg.detect_layer)
    if detect < 0:
        detect += depth
    if not 0 <= detect < depth:
        raise ParameterError(f"{{detect_layer}} {cfg.detect_layer} out of range (model has {depth} blocks)", "detect_layer")
    if isinstance(cfg.max_layer, int) and not 0 <= cfg.max_layer < depth:
        raise ParameterError(f"{{max_layer}} {cfg.max_layer} out of range (model has {depth} blocks)", "max_layer")
    score_layers = detect if cfg.max_layer == "auto" else min(int(cfg.max_layer), depth - 1)
    return detect, score_layers


@torch.inference_mode()
def find_register_neurons(
    model: nn.Module,
    images: str | Path | Iterable[Path],
    config: DiscoveryConfig | None = None,
    *,
    adapter: Adapter,
    transform: Any = None,
    progress: bool = True,
    provenance: dict[str, Any] | None = None,
) -> DiscoveryResult:
    """Rank MLP hidden units by their mean |activation| at high-norm token positions; keep the top.

    See REFERENCE.md for the method; differences: every image of a batch is used, prefix tokens are
    excluded from outlier positions, image sampling is seeded, and statistics stream.
    """
    cfg = config or DiscoveryConfig()
    fam = adapter
    blocks = fam.blocks(model)
    depth = len(blocks)
    detect, score_layers = layer_range(cfg, depth)
    if isinstance(images, (str, Path)):
        files = list_images(images, cfg.num_images, cfg.seed)
    else:
        files = list(images)
    tf = transform or fam.data_transform(model)
    hidden_sizes = [fam.mlp_width(b) for b in blocks[: score_layers + 1]]
    stats = NeuronStatistics(hidden_sizes, detect + 1, next(model.parameters()).device)
    batches = ImageBatches(files, tf, cfg.batch_size, progress=progress, desc="calibrating")
    used = _stream_statistics(model, fam, blocks, batches, stats, cfg, detect=detect, score_layers=score_layers)
    batches.require_some(used)
    return summarise(stats, cfg, detect=detect, score_layers=score_layers, depth=depth, hidden_sizes=hidden_sizes,
                     num_files=len(files), skipped=len(batches.skipped), family_name=fam.name, provenance=provenance)


def _install_hooks(blocks: list[nn.Module], fam: Adapter, detect: int, score_layers: int,
                   norms: list[torch.Tensor | None], hidden: dict[int, torch.Tensor]) -> list[Any]:
    """Hooks that fill `norms[i]` (block i's output token norms, i <= detect) and `hidden[i]` (block
    i's post-activation MLP units, i <= score_layers) on every forward pass; returns their handles."""
    handles = []
    for i in range(detect + 1):
        handles.append(blocks[i].register_forward_hook(
            lambda _m, _a, out, i=i: norms.__setitem__(i, fam.block_output(out).float().norm(dim=-1))))
    for i in range(score_layers + 1):
        handles.append(fam.down_proj(fam.get_mlp(blocks[i])).register_forward_pre_hook(
            lambda _m, args, i=i: hidden.__setitem__(i, args[0])))
    return handles


def _stream_statistics(model: nn.Module, fam: Adapter, blocks: list[nn.Module], batches: ImageBatches,
                       stats: NeuronStatistics, cfg: DiscoveryConfig, *, detect: int, score_layers: int) -> int:
    """Run every calibration batch once through `model` (eval mode, hooks removed and the training
    flag restored afterwards) and fold it into `stats`; returns how many images were used."""
    p = fam.num_prefix_tokens(model)
    device = next(model.parameters()).device
    dtype = compute_dtype(model)  # a model stored in half precision to compute in float32 runs block by block
    norms: list[torch.Tensor | None] = [None] * (detect + 1)
    hidden: dict[int, torch.Tensor] = {}
    handles = _install_hooks(blocks, fam, detect, score_layers, norms, hidden)
    was_training = model.training
    model.eval()
    try:
        with cast_blockwise(model, fam.blocks(model), dtype):
            used = _run_batches(model, fam, batches, device, dtype, norms, hidden, stats, cfg, p, detect)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return used


def _run_batches(model: nn.Module, fam: Adapter, batches: ImageBatches, device: torch.device, dtype: torch.dtype,
                 norms: list, hidden: dict, stats: NeuronStatistics, cfg: DiscoveryConfig, p: int, detect: int) -> int:
    """Each batch through `model`, folded into `stats`; returns how many images were used."""
    used = 0
    for pixels, paths in batches:
        fam.forward_tokens(model, pixels.to(device=device, dtype=dtype))
        mask, thr = outlier_mask(norms[detect], p, cfg.threshold, cfg.include_prefix)
        stats.update(norms, hidden, mask, thr, p, cfg.sparsity_filter)
        stats.add_histogram(norms[detect][:, p:])
        used += len(paths)
        hidden.clear()
    return used


# Fewer images with outliers than this (or under a quarter of the images) is thin evidence for a ranking.
MIN_EVIDENCE_IMAGES = 4


MIN_CALIBRATION_IMAGES = 8  # below this, a ranking of register neurons is a handful's noise


def evidence_notes(with_outliers: int, images: int) -> list[str]:
    """Why the neurons may rest on thin evidence, in words ([] when they do not): few images, few of
    them with outliers, or outliers in only a small share of them."""
    notes = []
    if images < MIN_CALIBRATION_IMAGES:
        notes.append(f"only {images} calibration image(s): use 32 or more (the reference used 100)")
    if with_outliers < min(MIN_EVIDENCE_IMAGES, images) or 4 * with_outliers < images:
        notes.append(f"only {with_outliers} of {images} image(s) had outlier tokens")
    return notes


def warn_thin_evidence(with_outliers: int, images: int) -> None:
    """Say so when the neurons rest on thin evidence: the ranking of a handful of images is noise-prone."""
    notes = evidence_notes(with_outliers, images)
    if notes:
        warnings.warn(f"the register neurons rest on thin evidence: {'; '.join(notes)}; use more calibration "
                      "images (or check --threshold / --detect-layer)", stacklevel=2)


def summarise(stats: NeuronStatistics, cfg: DiscoveryConfig, *, detect: int, score_layers: int, depth: int,
              hidden_sizes: list[int], num_files: int, skipped: int, family_name: str,
              provenance: dict[str, Any] | None) -> DiscoveryResult:
    """Rank the units from the streamed statistics and cut the list (shared by every model runner)."""
    counts = {"images": stats.images, "images_with_outliers": stats.images_with_outliers,
              "outlier_tokens": stats.outlier_tokens, "patch_tokens": stats.patch_tokens,
              "skipped_images": skipped}
    layers = stats.layer_table()
    thr_info = _threshold_info(stats, cfg, detect)
    if stats.images_with_outliers == 0:
        raise _no_outliers_error(stats, detect, thr_info["rule"])
    warn_thin_evidence(stats.images_with_outliers, stats.images)
    max_layer = emergence_layer(layers, detect) if cfg.max_layer == "auto" else int(cfg.max_layer)
    max_layer = min(max_layer, score_layers)
    ranked = _rank_units(stats, max_layer)
    k, rule = select_top_k([r[0] for r in ranked], cfg.top_k)
    neurons: dict[int, list[int]] = {}
    for _, layer, unit in ranked[:k]:
        neurons.setdefault(layer, []).append(unit)
    recipe = Recipe(neurons=neurons, num_registers=cfg.num_registers, scale=cfg.scale, mode=cfg.mode)
    prov = dict(provenance or {})
    prov.update({"family": family_name, "depth": depth, "hidden_sizes": sorted(set(hidden_sizes)),
                 "num_images": num_files, "seed": cfg.seed, "batch_size": cfg.batch_size,
                 "sparsity_filter": cfg.sparsity_filter, "include_prefix": cfg.include_prefix})
    return DiscoveryResult(
        recipe=recipe,
        ranking=[{"layer": layer, "unit": unit, "score": s} for s, layer, unit in ranked],
        cut=k, cut_rule=rule, threshold=thr_info, detect_layer=detect, max_layer=max_layer,
        counts=counts, layers=layers, provenance=prov,
    )


def _threshold_info(stats: NeuronStatistics, cfg: DiscoveryConfig, detect: int) -> dict[str, Any]:
    """The outlier threshold as reported in neurons.json: mode, fixed value, per-image mean, rule."""
    return {
        "mode": "auto" if cfg.threshold == "auto" else "fixed",
        "value": None if cfg.threshold == "auto" else float(cfg.threshold),
        "mean_per_image": stats.threshold_sum / max(stats.images, 1),
        "rule": (f"norm > {AUTO_FACTOR} x the image's median patch-token norm at block {detect}"
                 if cfg.threshold == "auto" else f"norm > {cfg.threshold} at block {detect}"),
    }


def _no_outliers_error(stats: NeuronStatistics, detect: int, rule: str) -> NoOutliersError:
    """The refusal when no token crossed the threshold, with the norm percentiles to pick another."""
    med, p99, p999, mx = (stats.percentile(50), stats.percentile(99), stats.percentile(99.9),
                          float(stats.max_sum[detect] / max(stats.images, 1)))
    return NoOutliersError(
        f"no outlier tokens at block {detect} ({rule}) in {stats.images} images; "
        f"patch-token norms: median {med:.3g}, p99 {p99:.3g}, p99.9 {p999:.3g}, mean per-image max {mx:.3g}; "
        f"try --threshold {p99:.3g} (the 99th percentile) or another --detect-layer"
    )


def _rank_units(stats: NeuronStatistics, max_layer: int) -> list[tuple[float, int, int]]:
    """The best GAP_WINDOW + 1 (score, layer, unit) over blocks 0..max_layer, best first; a unit's
    score is its mean |activation| at outlier positions over the images that had outliers."""
    ranked: list[tuple[float, int, int]] = []
    for layer in range(max_layer + 1):
        mean = (stats.score_sum[layer] / stats.images_with_outliers).cpu()
        vals, idx = mean.topk(min(GAP_WINDOW + 1, mean.numel()))
        ranked += [(float(v), layer, int(u)) for v, u in zip(vals, idx)]
    ranked.sort(key=lambda t: (-t[0], t[1], t[2]))  # ties broken by position: deterministic
    return ranked[: GAP_WINDOW + 1]
