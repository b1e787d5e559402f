"""`vit-surgery inspect` (before/after report) and `vit-surgery eval` (k-NN accuracy before/after)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .args import fraction, positive_float, positive_int, threshold_arg, add_model_options
from ..core.output_format import write_json


def _options(a: argparse.Namespace):
    from ..core.source import LoadOptions

    return LoadOptions(a.allow_unsafe_pickle, a.trust_remote_code, a.device)


def _knn_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return {"k": a.k, "test_fraction": a.test_fraction, "seed": a.seed, "max_per_class": a.max_per_class,
            "batch_size": a.batch_size, "temperature": a.temperature}


def cmd_inspect(a: argparse.Namespace) -> int:
    from ..report import run_inspect

    opts: dict[str, Any] = {"neurons": a.neurons, "options": _options(a), "num_images": a.num_images,
                            "show": a.show, "batch_size": a.batch_size, "seed": a.seed, "threshold": a.threshold,
                            "detect_layer": a.detect_layer, "lm_attention": not a.no_lm_attention}
    if a.dataset:
        opts["dataset"] = a.dataset
        opts["knn"] = {"k": a.k, "test_fraction": a.test_fraction, "seed": a.seed, "batch_size": a.batch_size}
    path = run_inspect(a.model, a.out, a.images, source=a.source, overwrite=a.overwrite, progress=not a.quiet,
                       **opts)
    summary = json.loads((path.parent / "summary.json").read_text())
    mo, mb = summary["metrics"]["original"], summary["metrics"].get("baked")
    if mb:
        cos = summary["pooled_cosine_similarity"]
        print(f"outlier share of patch tokens: {mo['outlier_share']:.2%} -> {mb['outlier_share']:.2%}; "
              f"max/median patch norm: {mo['max_over_median_patch_norm']:.2f} -> {mb['max_over_median_patch_norm']:.2f}; "
              f"CLS attention on top 1% patches: {mo['cls_attention_top_patch_mass']:.2%} -> "
              f"{mb['cls_attention_top_patch_mass']:.2%} (register: {mb['cls_attention_register_mass']:.2%}); "
              f"pooled-output cosine similarity {cos['mean']:.6f}")
    else:
        print(f"outlier share of patch tokens: {mo['outlier_share']:.2%}; max/median patch norm: "
              f"{mo['max_over_median_patch_norm']:.2f} (nothing baked: {'; '.join(summary['notes'])})")
    if summary.get("knn"):
        k = summary["knn"]
        print(f"k-NN top-1: {k['top1_original']:.2%} -> {k['top1_baked']:.2%} ({k['delta_points']:+.2f} points)")
    print(f"wrote {path}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from ..report.knn_eval import run_eval

    from ..core.outputs import atomic_output_file, check_output_target

    if a.json:
        check_output_target(a.json, a.overwrite, "file")
    res = run_eval(a.model, a.out_dir, a.dataset, options=_options(a), progress=not a.quiet, **_knn_kwargs(a))
    print(res.summary())
    if a.json:
        out = Path(a.json)
        doc = {"original": a.model if a.out_dir else f"{a.model} (un-baked copy)",
               "baked": a.out_dir or a.model, **res.to_dict()}
        with atomic_output_file(out, a.overwrite) as tmp:  # the shared scheme: never a special file, no partials
            write_json(tmp, doc)
        print(f"wrote {out}")
    return 0


def add_commands(sub: Any) -> None:
    i = sub.add_parser(
        "inspect", help="before/after report: norm traces, norm and attention maps, neuron ranking, numbers",
        description="Write a self-contained HTML report (pictures embedded), the PNGs and summary.json. "
                    "MODEL|OUT: a converted folder (the original is its un-baked copy), or a plain model: then the "
                    "baked side is baked in memory from --neurons, else from neurons found on --images.")
    i.add_argument("model", metavar="MODEL|OUT", help="a converted folder, or an original model")
    i.add_argument("--images", default=None,
                   help="folder of images to measure on (searched recursively; default: the built-in calibration set)")
    i.add_argument("--out", required=True, help="report folder to write (report.html, *.png, summary.json)")
    i.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    i.add_argument("--source", default=None, metavar="MODEL",
                   help="with a converted OUT: compare against this original model instead of the un-baked weights")
    i.add_argument("--neurons", default=None,
                   help="with a plain MODEL: bake these neurons (file or published set) instead of finding them")
    i.add_argument("--num-images", type=positive_int, default=64, help="seeded sample of this many images (default 64)")
    i.add_argument("--show", type=positive_int, default=6, help="images drawn in the maps (default 6)")
    i.add_argument("--batch-size", type=positive_int, default=8)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--threshold", type=threshold_arg, default="auto",
                   help="outlier rule: a norm, or 'auto' (default): > 2.5 x the image's median patch-token norm")
    i.add_argument("--detect-layer", type=int, default=None,
                   help="block whose output is measured (default: the discovery record's, else the last block)")
    i.add_argument("--no-lm-attention", action="store_true",
                   help="VLMs: leave out the language model's attention to the image tokens (its attention "
                        "maps for every layer are what a 7B's report would not fit in memory)")
    g = i.add_argument_group("optional k-NN section")
    g.add_argument("--dataset", default=None, help="ImageFolder dataset: add k-NN accuracy before/after")
    g.add_argument("--k", type=positive_int, default=20)
    g.add_argument("--test-fraction", type=fraction, default=0.2)
    i.add_argument("-q", "--quiet", action="store_true")
    add_model_options(i)
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser(
        "eval", help="k-NN top-1 accuracy of the pooled features, original vs baked",
        description="Embed an ImageFolder dataset (DIR/CLASS/IMAGE) with both models and score a cosine k-NN "
                    "classifier on a deterministic seeded split (or DIR/train + DIR/val when present).")
    e.add_argument("model", metavar="MODEL", help="the original model (or a converted folder alone)")
    e.add_argument("out_dir", metavar="OUT", nargs="?", default=None,
                   help="the converted folder (omit to compare a converted MODEL with its un-baked copy)")
    e.add_argument("--dataset", required=True, help="ImageFolder layout: DIR/CLASS/IMAGE")
    e.add_argument("--k", type=positive_int, default=20, help="neighbours (default 20)")
    e.add_argument("--test-fraction", type=fraction, default=0.2, help="share of each class used as queries")
    e.add_argument("--max-per-class", type=positive_int, default=None, help="seeded sample per class (speed)")
    e.add_argument("--temperature", type=positive_float, default=0.07, help="vote weight exp(sim / T) (default 0.07)")
    e.add_argument("--batch-size", type=positive_int, default=32)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("-q", "--quiet", action="store_true")
    add_model_options(e)
    e.set_defaults(func=cmd_eval)
