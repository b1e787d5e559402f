"""Discovery throughput vs a plain forward pass, and discovery peak memory vs the number of images.

Model: timm `vit_base_patch16_clip_224` (ViT-B/16, 197 tokens), random weights with planted register
neurons so the calibration images produce real high-norm outliers. Images: 224-px organism PNGs
written to a temp folder. Discovery uses the CLI defaults (auto threshold, auto max-layer, auto top-k).

Targets (issue 6):
- discovery throughput >= 0.85 x the plain forward throughput, batch 8, same data loading;
- discovery peak memory flat in the number of images: 64 vs 512 images within 10 %.

Throughput: the two pipelines run interleaved in one process (plain, discovery, discovery, plain, ...)
and the ratio is the median of per-round ratios. "End to end" includes decoding and the eval
transform in both arms; "model only" feeds both arms the same pre-decoded tensors.
Memory: each measurement runs in its own child process (ru_maxrss is a per-process high-water mark).

    .venv/bin/python benchmarks/bench_discovery.py [--write]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import benchlib as bl

TARGET_RATIO = 0.85
TARGET_MEM = 0.10


class CachedBatches:
    """Stands in for surgery.images.ImageBatches with pre-decoded tensors (model-only timing)."""

    batches: list = []

    def __init__(self, files, transform, batch_size=8, progress=False, desc=""):
        self.files = files
        self.skipped: list = []

    def __iter__(self):
        return iter(CachedBatches.batches)

    def require_some(self, used: int) -> None:
        assert used > 0


def plain_forward(model, files, batch_size: int) -> int:
    """The same data loading as discovery, then only the forward pass (what discovery is compared to)."""
    import torch

    from surgery.families import family_for
    from surgery.images import ImageBatches

    fam = family_for(model)
    n = 0
    with torch.inference_mode():
        for pixels, paths in ImageBatches(files, fam.data_transform(model), batch_size, progress=False):
            fam.forward_tokens(model, pixels)
            n += len(paths)
    return n


def plain_forward_cached(model, batches) -> None:
    import torch

    with torch.inference_mode():
        for pixels, _ in batches:
            model.forward_features(pixels)


def discover(model, files, batch_size: int):
    from surgery.discovery import DiscoveryConfig, find_register_neurons

    return find_register_neurons(model, files, DiscoveryConfig(batch_size=batch_size), progress=False)


def child_memory(args) -> None:
    """Run in a fresh process: build the model, run one pipeline over N images, report ru_maxrss."""
    bl.set_threads(args.threads)
    import torch

    model = bl.build_vitb(plant=True)
    files = sorted(Path(args.images_dir).glob("*.png"))[: args.child_memory]
    with torch.inference_mode():
        model.forward_features(torch.zeros(1, 3, 224, 224))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.mode == "discovery":
        res = discover(model, files, args.batch_size)
        extra = {"neurons": {str(k): list(v) for k, v in res.recipe.neurons.items()}, "images": res.counts["images"]}
    else:
        extra = {"images": plain_forward(model, files, args.batch_size)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"base_mib": base, "peak_mib": peak, **extra}))


def run_child(mode: str, n: int, images_dir: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child-memory", str(n), "--images-dir", str(images_dir), "--mode", mode,
           "--threads", str(args.threads), "--batch-size", str(args.batch_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    print(f"  memory child {mode:9s} {n:4d} images: peak RSS {res['peak_mib']:.0f} MiB "
          f"(after model build {res['base_mib']:.0f} MiB)", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48, help="images per timed pass (end to end)")
    ap.add_argument("--model-only-images", type=int, default=32, help="images per timed pass (model only)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds per comparison")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-images", type=int, nargs=2, default=[64, 512])
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--write", action="store_true", help="write the 'Discovery' section of benchmarks/RESULTS.md")
    ap.add_argument("--note", default="", help="extra line for RESULTS.md (e.g. before/after a change)")
    ap.add_argument("--child-memory", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--images-dir", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="discovery", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_memory:
        return child_memory(args)

    bl.set_threads(args.threads)
    import torch

    import surgery.discovery as disc
    from surgery.families import family_for
    from surgery.images import ImageBatches

    work = bl.work_dir("discovery")
    n_files = max(args.images, args.model_only_images, *args.memory_images)
    files = bl.write_images(work, n_files)
    print(f"{n_files} images in {work}", flush=True)
    lines: list[str] = []
    results: dict = {}

    if not args.skip_throughput:
        model = bl.build_vitb(plant=True)
        B = args.batch_size
        with torch.inference_mode():  # warm-up (allocator, oneDNN kernels)
            model.forward_features(torch.zeros(B, 3, 224, 224))
        res = discover(model, files[:B], B)

        e2e_files = files[: args.images]
        t = bl.interleave({"forward": lambda: plain_forward(model, e2e_files, B),
                           "discovery": lambda: discover(model, e2e_files, B)}, args.rounds)
        thr_f = [args.images / s for s in t["forward"]]
        thr_d = [args.images / s for s in t["discovery"]]
        r_e2e = bl.paired_ratio(thr_d, thr_f)
        print(f"end to end: forward {bl.median(thr_f):.2f} img/s, discovery {bl.median(thr_d):.2f} img/s, "
              f"ratio {r_e2e:.3f} (rounds {[round(d / f, 3) for d, f in zip(thr_d, thr_f)]})", flush=True)

        tf = family_for(model).data_transform(model)
        CachedBatches.batches = list(ImageBatches(files[: args.model_only_images], tf, B, progress=False))
        real = disc.ImageBatches
        disc.ImageBatches = CachedBatches  # discovery reads the same pre-decoded tensors as the plain forward
        try:
            decode = bl.median([bl.timed(lambda: list(ImageBatches(files[: args.model_only_images], tf, B,
                                                                     progress=False))) for _ in range(2)])
            mo_files = files[: args.model_only_images]
            t2 = bl.interleave({"forward": lambda: plain_forward_cached(model, CachedBatches.batches),
                                "discovery": lambda: discover(model, mo_files, B)}, args.rounds)
        finally:
            disc.ImageBatches = real
        n2 = args.model_only_images
        mthr_f = [n2 / s for s in t2["forward"]]
        mthr_d = [n2 / s for s in t2["discovery"]]
        r_mo = bl.paired_ratio(mthr_d, mthr_f)
        decode_ms = 1000 * decode / n2
        print(f"model only: forward {bl.median(mthr_f):.2f} img/s, discovery {bl.median(mthr_d):.2f} img/s, "
              f"ratio {r_mo:.3f} (rounds {[round(d / f, 3) for d, f in zip(mthr_d, mthr_f)]}); "
              f"decode+transform {decode_ms:.1f} ms/img", flush=True)
        results.update(r_e2e=r_e2e, r_mo=r_mo)
        lines += [
            f"Throughput, batch {B}, {args.rounds} interleaved rounds (forward/discovery alternating), "
            f"median of per-round ratios:",
            "",
            "| pipeline | images/pass | plain forward (img/s, median) | discovery (img/s, median) | ratio | target ≥ 0.85 |",
            "|---|---|---|---|---|---|",
            f"| end to end (decode + transform + model) | {args.images} | {bl.median(thr_f):.2f} | "
            f"{bl.median(thr_d):.2f} | {r_e2e:.3f} | {bl.met(r_e2e >= TARGET_RATIO)} |",
            f"| model only (pre-decoded tensors) | {n2} | {bl.median(mthr_f):.2f} | {bl.median(mthr_d):.2f} | "
            f"{r_mo:.3f} | {bl.met(r_mo >= TARGET_RATIO)} |",
            "",
            f"Per-round ratios, end to end: {[round(d / f, 3) for d, f in zip(thr_d, thr_f)]}; "
            f"model only: {[round(d / f, 3) for d, f in zip(mthr_d, mthr_f)]}. "
            f"Decoding + eval transform: {decode_ms:.1f} ms per image (224-px PNG). "
            f"Discovery found {res.recipe.num_neurons} neurons on the warm-up batch "
            f"(the benchmark model has planted units {[u for u, _ in bl.PLANT[1]]} in block 1).",
            "",
        ]
        del model

    if not args.skip_memory:
        lo, hi = args.memory_images
        f_lo = run_child("forward", lo, work, args)
        d_lo = run_child("discovery", lo, work, args)
        d_hi = run_child("discovery", hi, work, args)
        growth = d_hi["peak_mib"] / d_lo["peak_mib"] - 1
        print(f"memory: discovery peak {d_lo['peak_mib']:.0f} MiB ({lo}) vs {d_hi['peak_mib']:.0f} MiB ({hi}): "
              f"{100 * growth:+.1f} %", flush=True)
        results.update(mem_growth=growth)
        lines += [
            f"Peak memory (ru_maxrss of a fresh child process per row, batch {args.batch_size}; "
            f"includes Python, torch and the 86 M-parameter model):",
            "",
            "| child process | images | RSS after model build (MiB) | peak RSS (MiB) |",
            "|---|---|---|---|",
            f"| plain forward (reference point) | {lo} | {f_lo['base_mib']:.0f} | {f_lo['peak_mib']:.0f} |",
            f"| discovery | {lo} | {d_lo['base_mib']:.0f} | {d_lo['peak_mib']:.0f} |",
            f"| discovery | {hi} | {d_hi['base_mib']:.0f} | {d_hi['peak_mib']:.0f} |",
            "",
            f"Discovery peak, {hi} vs {lo} images: {100 * growth:+.1f} % (target within 10 %: "
            f"{bl.met(abs(growth) <= TARGET_MEM)}). Discovery's extra peak over the plain forward at {lo} images: "
            f"{d_lo['peak_mib'] - f_lo['peak_mib']:.0f} MiB (hooked hidden activations of one batch).",
            "",
        ]

    body = bl.context_lines() + (f"- Note: {args.note}\n" if args.note else "") + "\n" + "\n".join(lines)
    print(body)
    if args.write:
        bl.write_section("Discovery", body)
        print(f"wrote section 'Discovery' of {bl.RESULTS}")


if __name__ == "__main__":
    main()
