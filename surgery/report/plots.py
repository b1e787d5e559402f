"""The report's figures (matplotlib, Agg): layer-norm traces, norm and attention maps, neuron ranking."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..core.discovery import AUTO_FACTOR
from ..core.recipe import Recipe

from .measure import Measurement

RANKING_BARS = 40  # ranked units drawn (at least the cut + 10)


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


def percent(v: float) -> str:
    return f"{v:.1%}" if v >= 0.01 or v == 0 else f"{100 * v:.2g}%"


def maps_figure(m: Measurement, key: str, path: Path, title: str, cbar_label: str, log: bool) -> bytes:
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
                sub += f": max patch {percent(float(it[s][key].max()))}"
                if it[s]["register_attn"] is not None:
                    sub += f",\nregister {percent(it[s]['register_attn'])}"
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


