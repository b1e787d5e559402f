"""`vit-surgery demo`: the whole pipeline on the built-in organism, with no network.

Writes OUT/source_model (the organism as an ordinary timm folder), OUT/neurons.json (find),
OUT/baked (convert + parity check) and OUT/report (before/after diagnostics).
"""
from __future__ import annotations

from pathlib import Path

from .core.discovery import DiscoveryConfig
from .backends import load_model
from .organisms.vit import build_timm_organism
from .core.images import builtin_images
from .core.outputs import atomic_output_dir
from .pipeline import run_convert, run_find
from .core.output_format import write_json


def save_organism(model, path: Path) -> Path:
    """Save an organism (built by build_timm_organism) as a timm local-dir."""
    from surgery.core.safetensors_io import save_state_dict

    src = model.organism_source
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"architecture": src["architecture"], "model_args": src["model_args"],
           "pretrained_cfg": {k: (list(v) if isinstance(v, tuple) else v) for k, v in src["pretrained_cfg"].items()}}
    write_json(path / "config.json", cfg)
    save_state_dict(model.state_dict(), path / "model.safetensors", {"organism": True})
    return path


def run_demo(out: Path, overwrite: bool = False, quiet: bool = False, seed: int = 0) -> int:
    progress = not quiet
    with atomic_output_dir(out, overwrite) as tmp:
        model, planting = build_timm_organism(seed, "clip")
        src_dir = save_organism(model, tmp / "source_model")
        print(f"built the demonstration organism (CLIP-style timm ViT, planted register neurons "
              f"{ {k: v for k, v in planting.neurons.items()} }) -> {out / 'source_model'}")
        loaded = load_model(str(src_dir))
        loaded.spec = str(out / "source_model")  # where it will be, not the temporary folder (reproducible files)
        loaded.extra["source_path_from_output"] = "../source_model"  # `check OUT/baked` finds it next to itself
        images = builtin_images()
        result = run_find(loaded, images, DiscoveryConfig(), progress)
        write_json(tmp / "neurons.json", result.to_json())
        found = {k: list(v) for k, v in result.recipe.neurons.items()}
        print(f"find: {result.recipe.num_neurons} register neurons {found} "
              f"({'matches' if found == planting.neurons else 'DIFFERS FROM'} the planted set)")
        res = run_convert(loaded, tmp / "baked", neurons=str(tmp / "neurons.json"), images=images,
                          progress=progress)
        print(f"convert: {res.report.summary()}")
        b, f = res.effect["before"], res.effect["after"]
        print(f"effect: outlier share {b['outlier_share']:.2%} -> {f['outlier_share']:.2%}, "
              f"max/median patch norm {b['max_over_median_patch_norm']:.1f} -> {f['max_over_median_patch_norm']:.1f}, "
              f"CLS attention on top patches {b['cls_attention_top_patch_mass']:.1%} -> "
              f"{f['cls_attention_top_patch_mass']:.1%}, on the register {f['cls_attention_register_mass']:.1%}")
        try:
            from .report import write_report
        except ImportError:
            write_report = None
        if write_report is not None:
            # the same images as convert's check (same count, same seed), so the numbers agree with the above
            write_report(str(src_dir), str(tmp / "baked"), images, tmp / "report", progress=progress,
                         num_images=res.report.images)
            print(f"report: {out / 'report' / 'report.html'} (the same {res.report.images} images as the check)")
    print(f"wrote {out}")
    return 0
