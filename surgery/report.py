"""`vit-surgery inspect`: a self-contained before/after report of what the fix does to a model.

The report folder holds report.html (every picture embedded as a base64 data URI: no network, no
sibling files needed), the same pictures as PNGs, and summary.json with every number shown.

Which two models are compared:
- `write_report(MODEL, OUT)`: an original model and its converted folder;
- `write_report(OUT)`: a converted folder alone; the original is its un-baked copy (`unbake` on a
  deep copy, exact because baking only permutes the original weights);
- `write_report(MODEL)`: a plain model; the baked side is baked in memory from `neurons=` (a
  neurons file or a published set) if given, else from register neurons found on the report's own
  images. Discovery is one forward pass over those images, the same cost as the diagnostics
  themselves, so it always runs; when it finds no outliers the report shows the original only and
  says so.

The neuron ranking comes from the discovery record that produced the baked model when one can be
found (`neurons=` file, OUT/neurons.json, OUT/surgery.json "discovery", or a neurons.json next to
OUT that names the same neurons); otherwise discovery runs on the report's images.
"""
from __future__ import annotations

import base64
import copy
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .core.bake import baked_copy, register_token_indices
from .core.discovery import AUTO_FACTOR, DiscoveryConfig, emergence_layer, find_register_neurons, outlier_mask
from .core.effect import cls_attention, effect_metrics, token_diagnostics
from .core.errors import NoOutliersError, ParameterError
from .core.output_format import NEURONS_FILE, SURGERY_FILE
from .core.images import ImageBatches, list_images
from .core.source import LoadedModel, LoadOptions
from .backends import load_model
from .core.recipe import Recipe

DEFAULT_NUM_IMAGES = 64  # images measured (a seeded sample when the folder has more)
DEFAULT_SHOW = 6  # images drawn in the norm and attention maps
RANKING_BARS = 40  # ranked units drawn (at least the cut + 10)

PNG_FILES = ("layer_norms.png", "norm_maps.png", "attention_maps.png", "neuron_ranking.png")

METRIC_ROWS = [  # (key, label, format)
    ("outlier_share", "outlier share of patch tokens", "{:.2%}"),
    ("max_over_median_patch_norm", "max / median patch-token norm", "{:.2f}"),
    ("max_patch_norm", "max patch-token norm", "{:.3g}"),
    ("median_patch_norm", "median patch-token norm", "{:.3g}"),
    ("cls_attention_top_patch_mass", "CLS attention mass on the top 1 % of patches", "{:.2%}"),
    ("cls_attention_entropy", "CLS attention entropy, all tokens (nats)", "{:.3f}"),
    ("cls_patch_attention_entropy", "CLS attention entropy over patches, renormalised (nats)", "{:.3f}"),
    ("cls_attention_register_mass", "CLS attention mass on the test-time register(s)", "{:.2%}"),
    ("register_norm", "test-time register token norm", "{:.3g}"),
]


# ---- models -----------------------------------------------------------------------------------

@dataclass
class Pair:
    original: LoadedModel
    baked: Optional[LoadedModel]
    how: str  # how the baked side was obtained
    ranking_doc: Optional[dict[str, Any]] = None
    ranking_source: str = ""  # how the ranking was obtained (appended to ranking_path when that is set)
    ranking_path: str = ""  # the file it was read from
    notes: list[str] = field(default_factory=list)
    original_label: str = ""
    original_suffix: str = ""  # e.g. " (un-baked copy)"
    baked_label: Optional[str] = None  # None: baked in memory


def _files(images: Any, num_images: Optional[int], seed: int) -> list[Path]:
    if isinstance(images, (str, Path)):
        return list_images(images, num_images, seed)
    files = [Path(p) for p in images]
    if num_images is not None and len(files) > num_images:
        import random

        files = sorted(random.Random(seed).sample(files, num_images))
    return files


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _same_neurons(doc: dict[str, Any], recipe: Recipe) -> bool:
    try:
        return Recipe.from_dict(doc).neurons == recipe.neurons
    except Exception:
        return False


def _find_ranking(folder: Path, recipe: Recipe) -> tuple[Optional[dict[str, Any]], str]:
    """The discovery record that produced the converted folder, if it is around."""
    cands = [(folder / NEURONS_FILE, None), (folder / SURGERY_FILE, "discovery"), (folder.parent / NEURONS_FILE, None)]
    for path, key in cands:
        doc = _read_json(path) if path.is_file() else None
        if doc is not None and key:
            doc = doc.get(key) if isinstance(doc.get(key), dict) else None
        if doc is not None and isinstance(doc.get("scores"), list) and _same_neurons(doc, recipe):
            return doc, str(path), (f' ("{key}")' if key else "")
    return None, "", ""


def _discover(loaded: LoadedModel, files: list[Path], cfg: DiscoveryConfig, progress: bool) -> dict[str, Any]:
    res = find_register_neurons(loaded.model, files, cfg, adapter=loaded.adapter, transform=loaded.transform,
                                progress=progress, provenance={"model": loaded.spec, "images": "report images"})
    return res.to_json()


def resolve_pair(model_spec: str, baked_spec: Optional[str], files: list[Path], *, options: Optional[LoadOptions],
                 neurons: Optional[str], cfg: DiscoveryConfig, progress: bool) -> Pair:
    from .knn_eval import original_and_baked
    from .pipeline import resolve_recipe

    if baked_spec is not None:
        original, baked = original_and_baked(model_spec, baked_spec, options)
        pair = Pair(original, baked, "converted folder", original_label=model_spec, baked_label=baked_spec)
        folder = Path(baked_spec)
    else:
        first = load_model(model_spec, options)
        if first.recipe is not None:
            original, baked = _unbaked(first)
            pair = Pair(original, baked, "converted folder; the original is its un-baked copy (exact)",
                        original_label=model_spec, original_suffix=" (un-baked copy)", baked_label=model_spec)
            folder = Path(model_spec)
        else:
            folder = None
            if neurons:
                recipe, doc = resolve_recipe(first, neurons, {})
                pair = Pair(first, None, f"baked in memory from {neurons}", original_label=model_spec)
                if isinstance(doc.get("scores"), list):
                    pair.ranking_doc, pair.ranking_path = doc, neurons
            else:
                try:
                    doc = _discover(first, files, cfg, progress)
                except NoOutliersError as e:
                    return Pair(first, None, "not baked", notes=[f"discovery found nothing to fix: {e}"],
                                original_label=model_spec)
                recipe = Recipe.from_dict(doc)
                pair = Pair(first, None, "baked in memory from register neurons found on these images",
                            ranking_doc=doc, ranking_source="discovery on the report images",
                            original_label=model_spec)
            baked = copy.copy(first)
            baked.model = baked_copy(first.model, recipe, adapter=first.adapter)
            baked.recipe = recipe
            pair.baked = baked
    if pair.ranking_doc is None and folder is not None and folder.is_dir():
        pair.ranking_doc, pair.ranking_path, pair.ranking_source = _find_ranking(folder, pair.baked.recipe)
    if pair.ranking_doc is None:
        try:
            pair.ranking_doc = _discover(pair.original, files, cfg, progress)
            pair.ranking_source = "discovery on the report images (no discovery record found with the model)"
            if not _same_neurons(pair.ranking_doc, pair.baked.recipe):
                pair.notes.append("discovery on the report images chose other neurons than the baked model holds; "
                                  "the ranking shows what these images point to")
        except NoOutliersError as e:
            pair.notes.append(f"no neuron ranking: {e}")
    return pair


def _unbaked(first: LoadedModel) -> tuple[LoadedModel, LoadedModel]:
    from .knn_eval import unbaked_original

    return unbaked_original(first, first.spec), first


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
    """Record the batch's image names, and the maps of the first `show` images for the figures."""
    for i, path in enumerate(paths):
        sums.names.append(Path(path).name)
        if len(sums.shown) < show:
            item = {"name": Path(path).name, "pixels": _display_pixels(pixels[i], stats_px)}
            for name, d in per_image.items():
                item[name] = {"norms": d["norms"][i].numpy(), "attn": d["attn"][i].numpy(),
                              "mask": d["mask"][i].numpy(),
                              "register_attn": None if d["register_attn"] is None else float(d["register_attn"][i])}
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
            sums.cosine += torch.nn.functional.cosine_similarity(per_image["original"]["pooled"].double(),
                                                                 per_image["baked"]["pooled"].double(), dim=1).tolist()
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


# ---- figures ----------------------------------------------------------------------------------

def _figure(w: float, h: float):
    from matplotlib.figure import Figure  # no pyplot: no global backend state (Agg is used to save)

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _save(fig, path: Path) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    data = buf.getvalue()
    path.write_bytes(data)
    return data


COLORS = {"median": "#1f77b4", "p99": "#ff7f0e", "max": "#d62728", "register": "#2ca02c"}


def plot_layer_norms(m: Measurement, recipe: Optional[Recipe], path: Path) -> bytes:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig = _figure(11, 4.8)
    ax, ax2 = fig.subplots(1, 2)
    x = np.arange(m.depth)
    handles = []
    for side, style in (("original", "-"), ("baked", "--")):
        t = m.trace.get(side)
        if t is None:
            continue
        handles.append(Line2D([], [], color="black", ls=style, label=side))
        for key in ("median", "p99", "max"):
            ax.plot(x, getattr(t, key), style, color=COLORS[key], marker="o", ms=3)
        if t.register is not None:
            ax.plot(x, t.register, ":", color=COLORS["register"], marker="s", ms=4)
        ratio = np.asarray(t.max) / np.maximum(np.asarray(t.median), 1e-12)
        ax2.plot(x, ratio, style, color=COLORS["max"], marker="o", ms=3)
    handles += [Line2D([], [], color=COLORS[k], label=f"{k} patch norm") for k in ("median", "p99", "max")]
    if "baked" in m.trace and m.trace["baked"].register is not None:
        handles.append(Line2D([], [], color=COLORS["register"], ls=":", marker="s", ms=4, label="register token (baked)"))
    if m.threshold == "auto":
        ax2.axhline(AUTO_FACTOR, color="gray", lw=1, ls=":")
        ax2.text(0, AUTO_FACTOR * 1.08, f"outlier rule: {AUTO_FACTOR:g} x median", fontsize=7, color="gray")
    else:
        ax.axhline(float(m.threshold), color="gray", lw=1, ls=":")
        ax.text(0, float(m.threshold) * 1.08, f"outlier rule: norm > {float(m.threshold):g}", fontsize=7, color="gray")
    for a in (ax, ax2):
        if recipe is not None:
            for layer in recipe.neurons:
                a.axvspan(layer - 0.4, layer + 0.4, color="#bcbd22", alpha=0.18, lw=0)
        if m.emergence is not None:
            a.axvline(m.emergence, color="#d62728", lw=1, ls="-.")
        a.set_xlabel("block (0-based)")
        a.set_xticks(x)
        a.set_yscale("log")
        _plain_log_axis(a.yaxis)
        a.grid(alpha=0.25, which="both")
    if recipe is not None:
        handles.append(Patch(color="#bcbd22", alpha=0.3, label="blocks with register neurons"))
    if m.emergence is not None:
        handles.append(Line2D([], [], color="#d62728", ls="-.", label=f"outliers appear (block {m.emergence})"))
    ax.set_ylabel("patch-token L2 norm at block output")
    ax.set_title("Patch-token norms per block (mean over images)", fontsize=10)
    ax2.set_ylabel("max / median patch-token norm")
    ax2.set_title(f"Outlier strength per block (measured at block {m.detect_layer})", fontsize=10)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=8)
    fig.suptitle(f"Token norms through the network, {len(m.images)} images", fontsize=11)
    return _save(fig, path)


def _plain_fmt(v: float, _pos: Any = None) -> str:
    return f"{v:g}"


def _plain_minor_fmt(v: float, _pos: Any = None) -> str:
    """Label minor log ticks only at 2x and 5x a decade (keeps the axis readable)."""
    if v <= 0:
        return ""
    mant = v / 10 ** math.floor(math.log10(v) + 1e-9)
    return f"{v:g}" if round(mant, 6) in (2.0, 5.0) else ""


def _plain_log_axis(axis: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(_plain_fmt))
    axis.set_minor_formatter(FuncFormatter(_plain_minor_fmt))


def _pct(v: float) -> str:
    return f"{v:.1%}" if v >= 0.01 or v == 0 else f"{100 * v:.2g}%"


def _maps_figure(m: Measurement, key: str, path: Path, title: str, cbar_label: str, log: bool) -> bytes:
    from matplotlib.colors import LogNorm, Normalize

    sides = [s for s in ("original", "baked") if s in m.show[0]]
    rows = len(m.show)
    gh, gw = m.grid
    vals = np.concatenate([it[s][key].ravel() for it in m.show for s in sides])
    if log:
        pos = vals[vals > 0]
        lo = float(pos.min()) if pos.size else 1e-6
        norm = LogNorm(vmin=lo, vmax=max(float(vals.max()), lo * 1.0001))
    else:
        norm = Normalize(vmin=0.0, vmax=max(float(vals.max()), 1e-12))
    fig = _figure(2.3 * (1 + len(sides)) + 1.2, 2.2 * rows + 0.7)
    axes = np.asarray(fig.subplots(rows, 1 + len(sides), squeeze=False))
    im = None
    for r, it in enumerate(m.show):
        ax = axes[r, 0]
        ax.imshow(it["pixels"], interpolation="nearest")
        ax.set_ylabel(it["name"], fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
        if r == 0:
            ax.set_title("input (as the model sees it)", fontsize=9)
        for c, s in enumerate(sides, start=1):
            ax = axes[r, c]
            grid = it[s][key].reshape(gh, gw)
            im = ax.imshow(np.clip(grid, norm.vmin, None) if log else grid, cmap="inferno", norm=norm,
                           interpolation="nearest")
            ys, xs = np.nonzero(it["original"]["mask"].reshape(gh, gw))
            if len(xs):
                ax.scatter(xs, ys, s=max(6.0, 60.0 * (8.0 / max(gh, gw)) ** 2), facecolors="none",
                           edgecolors="#00e5ff", linewidths=1.0 if max(gh, gw) > 16 else 1.2)
            sub = s
            if key == "attn":
                sub += f": max patch {_pct(float(it[s][key].max()))}"
                if it[s]["register_attn"] is not None:
                    sub += f",\nregister {_pct(it[s]['register_attn'])}"
            else:
                sub += f" (max/median {float(it[s][key].max() / max(np.median(it[s][key]), 1e-12)):.1f})"
            ax.set_title(sub, fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
    cb = fig.colorbar(im, ax=axes[:, 1:].ravel().tolist(), shrink=0.9, aspect=40)
    cb.set_label(cbar_label + (" (log scale)" if log else ""))
    if log:
        _plain_log_axis(cb.ax.yaxis)
    lines = [title]
    if any(it["original"]["mask"].any() for it in m.show):
        lines.append("cyan circles: patches that are outliers in the original")
    if len(sides) > 1:
        lines.append("one color scale for original and baked")
    fig.suptitle("\n".join(lines), fontsize=10)
    return _save(fig, path)


def plot_ranking(doc: dict[str, Any], recipe: Optional[Recipe], path: Path) -> bytes:
    scores = doc.get("scores") or []
    sel = doc.get("selection") or {}
    cut = int(sel.get("top_k", 0) or 0)
    n = min(len(scores), max(RANKING_BARS, cut + 10))
    s = scores[:n]
    fig = _figure(11, 4.0)
    ax = fig.subplots()
    vals = np.array([float(e["score"]) for e in s])
    chosen = np.arange(n) < cut
    ax.bar(np.arange(n)[chosen], vals[chosen], color="#ff7f0e", label=f"chosen: top {cut}")
    ax.bar(np.arange(n)[~chosen], vals[~chosen], color="#9e9e9e", label="not chosen")
    if 0 < cut < n:
        ax.axvline(cut - 0.5, color="#d62728", ls="--", lw=1.2, label="cut")
    ax.set_xticks(np.arange(n))
    ax.set_xticklabels([f"{e['layer']}:{e['unit']}" for e in s], rotation=90, fontsize=7)
    ax.set_xlabel("register-neuron candidates, best first (block:unit)")
    ax.set_ylabel("score: mean |activation| at outlier positions")
    if vals.size and vals.min() > 0:
        ax.set_yscale("log")
        _plain_log_axis(ax.yaxis)
    ax.grid(alpha=0.25, axis="y", which="both")
    ax.legend(fontsize=8)
    rule = str(sel.get("rule", ""))
    ax.set_title(f"Neuron score ranking (top {n} of {len(scores)} candidates), cut: {rule}", fontsize=9, wrap=True)
    return _save(fig, path)


# ---- writing ----------------------------------------------------------------------------------

def _display_spec(spec: str, out_dir: Path) -> str:
    """Paths inside an output that is still being written (atomic temporary folder) are shown relative
    to the report, so the report does not name a folder that no longer exists once it is moved."""
    p = Path(spec)
    parent = out_dir.resolve().parent
    if p.exists() and parent.name.startswith(".") and ".partial-" in parent.name \
            and p.resolve().is_relative_to(parent):
        return os.path.relpath(p.resolve(), out_dir.resolve())
    return spec


def _fmt(v: Any, f: str) -> str:
    if v is None:
        return "–"
    try:
        return f.format(v)
    except (TypeError, ValueError):
        return html.escape(str(v))


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222}h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.3em .7em;text-align:right}
td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.note{background:#fff8e1;border-left:4px solid #ffb300;padding:.5em 1em}.small{color:#666;font-size:.9em}
code{background:#f4f4f4;padding:0 .2em}"""


def _html(summary: dict[str, Any], pictures: dict[str, bytes]) -> str:
    e = html.escape
    s = summary
    parts = _html_head(s) + _html_numbers(s) + _html_pictures(s, pictures)
    knn = s.get("knn")
    if knn:
        text = (f"{knn['delta_points']:+.2f} points; predictions agree on {knn['prediction_agreement']:.2%}; "
                f"{knn['gallery_images']} gallery / {knn['query_images']} query images, "
                f"{len(knn['classes'])} classes; {knn['split']}; dataset {knn['dataset']}")
        parts.append("<h2>k-NN accuracy (is the function kept?)</h2><table>"
                     "<tr><th></th><th>original</th><th>baked</th></tr>"
                     f"<tr><td>top-1 accuracy (k = {knn['k']}, cosine)</td><td>{knn['top1_original']:.2%}</td>"
                     f"<td>{knn['top1_baked']:.2%}</td></tr></table><p>{e(text)}</p>")
    parts.append(f'<p class="small">vit-surgery {e(s["tool_version"])}. Every number is in summary.json; '
                 "the pictures are also saved as PNG files next to this page.</p></body></html>")
    return "\n".join(parts)


def _html_head(s: dict[str, Any]) -> list[str]:
    """The page head, the table of what was compared on which images, and the notes."""
    e = html.escape
    skipped = f", {s['skipped_images']} unreadable skipped" if s["skipped_images"] else ""
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>vit-surgery report</title>"
             f"<style>{CSS}</style></head><body>",
             "<h1>Test-time register: before / after</h1>",
             "<table>",
             f"<tr><td>original</td><td>{e(s['original'])}</td></tr>",
             f"<tr><td>baked</td><td>{e(str(s['baked']))}</td></tr>",
             f"<tr><td>baked side</td><td>{e(s['baked_side'])}</td></tr>",
             f"<tr><td>register neurons</td><td>{e(json.dumps(s['recipe']['register_neurons']) if s['recipe'] else '–')}"
             f"{e(', R = ' + str(s['recipe']['num_registers'])) if s['recipe'] else ''}</td></tr>",
             f"<tr><td>images</td><td>{s['num_images']} from {e(str(s['images']))}{skipped}</td></tr>",
             f"<tr><td>measured at</td><td>block {s['detect_layer']} of {s['depth']}; outlier rule: "
             f"{e(str(s['threshold_rule']))}</td></tr>",
             "</table>"]
    for note in s["notes"]:
        parts.append(f'<p class="note">{e(note)}</p>')
    return parts


def _html_numbers(s: dict[str, Any]) -> list[str]:
    """The metric table, original against baked, and what its terms mean."""
    e = html.escape
    parts = ["<h2>Numbers</h2><table><tr><th>metric (mean over images)</th><th>original</th><th>baked</th></tr>"]
    mo, mb = s["metrics"].get("original", {}), s["metrics"].get("baked", {})
    for key, label, f in METRIC_ROWS:
        parts.append(f"<tr><td>{e(label)}</td><td>{_fmt(mo.get(key), f) if key in mo else '–'}</td>"
                     f"<td>{_fmt(mb.get(key), f) if key in mb else '–'}</td></tr>")
    cos = s.get("pooled_cosine_similarity")
    if cos:
        parts.append(f"<tr><td>cosine similarity of pooled outputs, original vs baked</td>"
                     f"<td colspan=\"2\">mean {cos['mean']:.7g}, min {cos['min']:.7g}</td></tr>")
    parts.append("</table>")
    parts.append('<p class="small">Outlier: a patch token whose norm at the measured block exceeds the rule above. '
                 'Top 1 %: the largest 1 % of the CLS token\'s attention weights over patches (at least one patch), '
                 'last block, averaged over heads. Entropy of the CLS attention row (last block, head average). '
                 'Pooled output: the model\'s image embedding / head output.</p>')
    return parts


def _html_pictures(s: dict[str, Any], pictures: dict[str, bytes]) -> list[str]:
    """One section per drawn picture, embedded, with its caption."""
    e = html.escape
    sections = [
        ("layer_norms.png", "Token norms per block",
         (f"Outliers appear at block {s['outliers_appear_at_block']}: the patches that are outliers at block "
          f"{s['detect_layer']} already break the outlier rule there, and reach 90 % of their peak norm ratio "
          f"at block {s['outliers_peak_from_block']}.") if s["outliers_appear_at_block"] is not None
         else "No outliers in the original on these images."),
        ("norm_maps.png", "Token-norm maps over the patch grid", ""),
        ("attention_maps.png", "Last-block CLS attention over patches", ""),
        ("neuron_ranking.png", "Register-neuron ranking and the chosen cut",
         f"Source: {s['ranking']['source']}." if s.get("ranking") else ""),
    ]
    parts = []
    for name, title, text in sections:
        if name not in pictures:
            continue
        parts.append(f"<h2>{e(title)}</h2>")
        if text:
            parts.append(f"<p>{e(text)}</p>")
        parts.append(_img(pictures[name], title))
    return parts


def write_report(model_spec: str, baked_spec: Optional[str] = None, images: Any = None,
                 out_dir: Path | str = "report", progress: bool = True, **opts: Any) -> Path:
    """Measure the original and the baked model on the same images; write report.html, the PNGs and
    summary.json into `out_dir` (created). Returns the path of report.html.

    opts: neurons (file or published set, for a plain MODEL), options (LoadOptions), num_images (64),
    show (6), batch_size (8), seed (0), threshold ("auto"), detect_layer (None: the discovery
    record's, else the last block), dataset (ImageFolder: adds a k-NN section), knn (dict of
    `knn_compare` keyword arguments).
    """
    from . import __version__
    from .core.images import builtin_images

    out_dir = Path(out_dir)
    seed = int(opts.get("seed", 0))
    files = _files(images if images is not None else builtin_images(), opts.get("num_images", DEFAULT_NUM_IMAGES), seed)
    batch_size = int(opts.get("batch_size", 8))
    threshold = opts.get("threshold", "auto")
    cfg = DiscoveryConfig(detect_layer=opts.get("detect_layer"), threshold=threshold, batch_size=batch_size, seed=seed)
    pair = resolve_pair(model_spec, baked_spec, files, options=opts.get("options"), neurons=opts.get("neurons"),
                        cfg=cfg, progress=progress)
    detect = opts.get("detect_layer")
    if detect is None and pair.ranking_doc is not None and isinstance(pair.ranking_doc.get("detect_layer"), int):
        detect = pair.ranking_doc["detect_layer"]
    m = measure(pair, files, detect_layer=detect, threshold=threshold, batch_size=batch_size,
                show=int(opts.get("show", DEFAULT_SHOW)), progress=progress)
    recipe = pair.baked.recipe if pair.baked is not None else None

    out_dir.mkdir(parents=True, exist_ok=True)
    pics = _draw_pictures(m, recipe, out_dir)
    ranking = _ranking_section(pair, recipe, out_dir, pics)
    knn = None
    if opts.get("dataset") and pair.baked is not None:
        from .knn_eval import knn_compare

        knn = knn_compare(pair.original.model, pair.baked.model, pair.original.adapter, pair.original.transform,
                          opts["dataset"], progress=progress, **(opts.get("knn") or {})).to_dict()
    images_label = str(images) if isinstance(images, (str, Path)) else f"{len(files)} files"
    summary = _summary(pair, m, recipe, out_dir, images_label=images_label, ranking=ranking, knn=knn,
                       pictures=list(pics), version=__version__)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=float) + "\n")
    html_path = out_dir / "report.html"
    html_path.write_text(_html(summary, pics), encoding="utf-8")
    return html_path


def _draw_pictures(m: Measurement, recipe: Optional[Recipe], out_dir: Path) -> dict[str, bytes]:
    """The layer-norm plot and (with images to show) the norm and attention maps, as PNG bytes by file
    name; each is also saved in `out_dir`."""
    pics: dict[str, bytes] = {}
    pics["layer_norms.png"] = plot_layer_norms(m, recipe, out_dir / "layer_norms.png")
    if m.show:
        pics["norm_maps.png"] = _maps_figure(m, "norms", out_dir / "norm_maps.png",
                                             f"Patch-token norms at block {m.detect_layer}", "token L2 norm", log=True)
        pics["attention_maps.png"] = _maps_figure(
            m, "attn", out_dir / "attention_maps.png",
            f"{'CLS' if m.has_cls else 'Mean patch-query (no CLS token)'} attention over patches, last block "
            f"(block {m.depth - 1}), mean over heads",
            "attention weight of the CLS token" if m.has_cls else "mean attention weight from the patches", log=False)
    return pics


def _ranking_section(pair: Pair, recipe: Optional[Recipe], out_dir: Path,
                     pics: dict[str, bytes]) -> Optional[dict[str, Any]]:
    """The neuron ranking's summary entry (None without a ranking); draws neuron_ranking.png into `pics`."""
    if pair.ranking_doc is None or not pair.ranking_doc.get("scores"):
        return None
    pics["neuron_ranking.png"] = plot_ranking(pair.ranking_doc, recipe, out_dir / "neuron_ranking.png")
    sel = pair.ranking_doc.get("selection") or {}
    source = (_display_spec(pair.ranking_path, out_dir) if pair.ranking_path else "") + pair.ranking_source
    return {"source": source, "cut": sel.get("top_k"), "rule": sel.get("rule"),
            "chosen": pair.ranking_doc.get("register_neurons"),
            "top": pair.ranking_doc["scores"][:max(RANKING_BARS, int(sel.get("top_k") or 0) + 10)]}


def _summary(pair: Pair, m: Measurement, recipe: Optional[Recipe], out_dir: Path, *, images_label: str,
             ranking: Optional[dict[str, Any]], knn: Optional[dict[str, Any]], pictures: list[str],
             version: str) -> dict[str, Any]:
    """summary.json: every number the report shows."""
    trace = {side: {"median": t.median, "p99": t.p99, "max": t.max,
                    **({"register": t.register} if t.register is not None else {})} for side, t in m.trace.items()}
    return {
        "tool_version": version,
        "original": _display_spec(pair.original_label, out_dir) + pair.original_suffix,
        "baked": None if pair.baked is None else (_display_spec(pair.baked_label, out_dir) if pair.baked_label
                                                  else "in memory"),
        "baked_side": pair.how,
        "recipe": recipe.to_dict() if recipe is not None else None,
        "register_indices": register_token_indices(pair.baked.model, adapter=pair.baked.adapter) if pair.baked else [],
        "images": _display_spec(images_label, out_dir), "num_images": len(m.images),
        "skipped_images": m.skipped, "image_files": m.images[:1000],
        "detect_layer": m.detect_layer, "depth": m.depth,
        "threshold_rule": m.metrics["original"].get("threshold_rule"),
        "metrics": m.metrics,
        "pooled_cosine_similarity": ({"mean": float(np.mean(m.cosine)), "min": float(np.min(m.cosine)),
                                      "per_image": m.cosine} if m.cosine else None),
        "outliers_appear_at_block": m.emergence,
        "outliers_peak_from_block": m.peak_from,
        "outlier_norm_per_block": m.outlier_norm,
        "layer_norms": trace,
        "outlier_norm_ratio_per_block": m.outlier_ratio,
        "ranking": ranking,
        "knn": knn,
        "attention_query": "CLS token" if m.has_cls else "mean over patch queries (the model has no CLS token)",
        "notes": pair.notes + ([] if m.has_cls else [
            "this model has no CLS token: every 'CLS attention' number and map uses the patches' mean attention row"]),
        "files": ["report.html", "summary.json", *pictures],
    }


def run_inspect(model_spec: str, out: str | Path, images: Any, *, source: Optional[str] = None,
                overwrite: bool = False, progress: bool = True, **opts: Any) -> Path:
    """`vit-surgery inspect MODEL|OUT --images DIR --out REPORT` (atomic: a failure leaves no REPORT)."""
    from .core.outputs import atomic_output_dir

    out = Path(out)
    with atomic_output_dir(out, overwrite) as tmp:
        if source is not None:
            write_report(source, model_spec, images, tmp, progress=progress, **opts)
        else:
            write_report(model_spec, None, images, tmp, progress=progress, **opts)
    return out / "report.html"
