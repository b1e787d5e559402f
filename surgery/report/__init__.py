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

The parts: pair.py (which two models), measure.py (the numbers and maps), plots.py (the figures),
page.py (the HTML page); this module puts them together.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..core.bake import register_token_indices
from ..core.discovery import DiscoveryConfig
from ..core.recipe import Recipe
from .measure import DEFAULT_SHOW, Measurement, measure
from .page import display_spec, report_html
from .pair import DEFAULT_NUM_IMAGES, Pair, image_files, resolve_pair
from .plots import RANKING_BARS, maps_figure, plot_layer_norms, plot_ranking
from ..core.output_format import write_json

PNG_FILES = ("layer_norms.png", "norm_maps.png", "attention_maps.png", "neuron_ranking.png")


def write_report(model_spec: str, baked_spec: Optional[str] = None, images: Any = None,
                 out_dir: Path | str = "report", progress: bool = True, **opts: Any) -> Path:
    """Measure the original and the baked model on the same images; write report.html, the PNGs and
    summary.json into `out_dir` (created). Returns the path of report.html.

    opts: neurons (file or published set, for a plain MODEL), options (LoadOptions), num_images (64),
    show (6), batch_size (8), seed (0), threshold ("auto"), lm_attention (True: a VLM's language-model
    attention section), detect_layer (None: the discovery
    record's, else the last block), dataset (ImageFolder: adds a k-NN section), knn (dict of
    `knn_compare` keyword arguments).
    """
    from .. import __version__
    from ..core.images import builtin_images

    out_dir = Path(out_dir)
    seed = int(opts.get("seed", 0))
    files = image_files(images if images is not None else builtin_images(), opts.get("num_images", DEFAULT_NUM_IMAGES), seed)
    batch_size = int(opts.get("batch_size", 8))
    threshold = opts.get("threshold", "auto")
    cfg = DiscoveryConfig(detect_layer=opts.get("detect_layer"), threshold=threshold, batch_size=batch_size, seed=seed)
    pair = resolve_pair(model_spec, baked_spec, files, options=opts.get("options"), neurons=opts.get("neurons"),
                        cfg=cfg, progress=progress)
    lm_attention_on = bool(opts.get("lm_attention", True))
    if lm_attention_on:
        from .lm_attention import require_lm_attention_fits

        require_lm_attention_fits(pair, batch_size)  # before any image is measured
    detect = opts.get("detect_layer")
    if detect is None and pair.ranking_doc is not None and isinstance(pair.ranking_doc.get("detect_layer"), int):
        detect = pair.ranking_doc["detect_layer"]
    m = measure(pair, files, detect_layer=detect, threshold=threshold, batch_size=batch_size,
                show=int(opts.get("show", DEFAULT_SHOW)), progress=progress)
    recipe = pair.baked.recipe if pair.baked is not None else None

    out_dir.mkdir(parents=True, exist_ok=True)
    pics = _draw_pictures(m, recipe, out_dir)
    lm_attention = _lm_attention_section(pair, files, out_dir, pics, batch_size=batch_size,
                                         show=int(opts.get("show", DEFAULT_SHOW)),
                                         progress=progress) if lm_attention_on else None
    ranking = _ranking_section(pair, recipe, out_dir, pics)
    knn = None
    if opts.get("dataset") and pair.baked is not None:
        from .knn_eval import knn_compare

        knn = knn_compare(pair.original.model, pair.baked.model, pair.original.adapter, pair.original.transform,
                          opts["dataset"], progress=progress, **(opts.get("knn") or {})).to_dict()
    images_label = _images_label(images, files)
    summary = _summary(pair, m, recipe, out_dir, images_label=images_label, ranking=ranking, knn=knn,
                       pictures=list(pics), version=__version__)
    if lm_attention is not None:
        summary["lm_attention"] = lm_attention
        summary["files"].append("lm_attention_maps.png")
    write_json(out_dir / "summary.json", summary)
    html_path = out_dir / "report.html"
    html_path.write_text(report_html(summary, pics), encoding="utf-8")
    return html_path


def _draw_pictures(m: Measurement, recipe: Optional[Recipe], out_dir: Path) -> dict[str, bytes]:
    """The layer-norm plot and (with images to show) the norm and attention maps, as PNG bytes by file
    name; each is also saved in `out_dir`."""
    pics: dict[str, bytes] = {}
    pics["layer_norms.png"] = plot_layer_norms(m, recipe, out_dir / "layer_norms.png")
    if m.show:
        pics["norm_maps.png"] = maps_figure(m, "norms", out_dir / "norm_maps.png",
                                             f"Patch-token norms at block {m.detect_layer}", "token L2 norm", log=True)
        pics["attention_maps.png"] = maps_figure(
            m, "attn", out_dir / "attention_maps.png",
            f"{'CLS' if m.has_cls else 'Mean patch-query (no CLS token)'} attention over patches, last block "
            f"(block {m.depth - 1}), mean over heads",
            "attention weight of the CLS token" if m.has_cls else "mean attention weight from the patches", log=False)
    return pics


def _images_label(images: Any, files: list[Path]) -> str:
    """How the report names its images: the folder given, never the installed package's own path."""
    from ..core.images import builtin_images

    if images is None or (isinstance(images, (str, Path)) and Path(images).resolve() == builtin_images().resolve()):
        return "the built-in calibration images"
    return str(images) if isinstance(images, (str, Path)) else f"{len(files)} files"


def _lm_attention_section(pair: Pair, files: list[Path], out_dir: Path, pics: dict[str, bytes], *, batch_size: int,
                          show: int, progress: bool) -> Optional[dict[str, Any]]:
    """Vision-language models: the language model's attention to the image tokens, before / after
    (surgery/report/lm_attention.py); draws lm_attention_maps.png into `pics`. None for other models."""
    from .lm_attention import is_vlm, measure_lm_attention, plot_lm_attention

    if not is_vlm(pair.original.adapter):
        return None
    result = measure_lm_attention(pair, files, batch_size=batch_size, show=show, progress=progress)
    data = plot_lm_attention(result, out_dir / "lm_attention_maps.png")
    if data is not None:
        pics["lm_attention_maps.png"] = data
    result.pop("_maps", None)
    return result


def _ranking_section(pair: Pair, recipe: Optional[Recipe], out_dir: Path,
                     pics: dict[str, bytes]) -> Optional[dict[str, Any]]:
    """The neuron ranking's summary entry (None without a ranking); draws neuron_ranking.png into `pics`."""
    if pair.ranking_doc is None or not pair.ranking_doc.get("scores"):
        return None
    pics["neuron_ranking.png"] = plot_ranking(pair.ranking_doc, recipe, out_dir / "neuron_ranking.png")
    sel = pair.ranking_doc.get("selection") or {}
    source = (display_spec(pair.ranking_path, out_dir) if pair.ranking_path else "") + pair.ranking_source
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
        "original": display_spec(pair.original_label, out_dir) + pair.original_suffix,
        "baked": None if pair.baked is None else (display_spec(pair.baked_label, out_dir) if pair.baked_label
                                                  else "in memory"),
        "baked_side": pair.how,
        "recipe": recipe.to_dict() if recipe is not None else None,
        "register_indices": register_token_indices(pair.baked.model, adapter=pair.baked.adapter) if pair.baked else [],
        "images": display_spec(images_label, out_dir), "num_images": len(m.images),
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
    from ..core.outputs import atomic_output_dir, refuse_input_overlap

    out = Path(out)
    refuse_input_overlap(out, {"the model": model_spec, "the images folder": images, "the --source model": source,
                               "the neurons file": opts.get("neurons"), "the dataset": opts.get("dataset")})
    with atomic_output_dir(out, overwrite) as tmp:
        if source is not None:
            write_report(source, model_spec, images, tmp, progress=progress, **opts)
        else:
            write_report(model_spec, None, images, tmp, progress=progress, **opts)
    return out / "report.html"
