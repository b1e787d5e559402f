"""CUDA timings (prepared; NOT run yet: no GPU was available when it was written).

  .venv/bin/python benchmarks/bench_gpu.py [--device cuda] [--batch 32] [--rounds 20]

Rows: baked vs original forward (ViT-B/16, random weights, BENCH_RECIPE baked) in float32, float16 and
bfloat16 — each model cast with .to(dtype), no autocast — and discovery (find_register_neurons over
64 images) vs one plain forward over the same images. CUDA events time the GPU work; arms alternate
per round so drift cancels. Prints a Markdown table for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.benchlib import BENCH_RECIPE, build_vitb, machine, today, work_dir, write_images  # noqa: E402


def cuda_ms(fn, rounds: int) -> float:
    import torch

    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def discovery_rows(source, fam, dev: str, batch: int, rounds: int) -> list[str]:
    """Discovery vs a plain forward over the same 64 images, interleaved per round: end to end (both arms
    decode the PNGs with the model's transform) and model only (both arms get the same decoded tensors)."""
    import time

    import torch

    import surgery.core.discovery as discovery
    from surgery.core.discovery import DiscoveryConfig, find_register_neurons
    from surgery.core.images import ImageBatches

    imgs = work_dir("gpu") / "imgs"
    files = write_images(imgs, 64)
    tf = fam.data_transform(source)
    decoded = list(ImageBatches(files, tf, batch, progress=False))

    class Decoded:  # stands in for ImageBatches with the decoded tensors (model-only arm)
        def __init__(self, *args, **kwargs):
            self.skipped: list = []

        def __iter__(self):
            return iter(decoded)

        def require_some(self, used: int) -> None:
            pass

    def plain(pre_decoded: bool) -> None:
        with torch.inference_mode():
            for x, _ in (decoded if pre_decoded else ImageBatches(files, tf, batch, progress=False)):
                fam.forward_tokens(source, x.to(dev, non_blocking=True))

    def find(pre_decoded: bool) -> None:
        real = discovery.ImageBatches
        discovery.ImageBatches = Decoded if pre_decoded else real
        try:
            find_register_neurons(source, files, DiscoveryConfig(batch_size=batch), adapter=fam, progress=False)
        finally:
            discovery.ImageBatches = real

    rows = []
    for pre in (False, True):
        t = {"plain": [], "find": []}
        for r in range(rounds // 4 + 2):
            for name in (("plain", "find") if r % 2 == 0 else ("find", "plain")):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                (plain if name == "plain" else find)(pre)
                torch.cuda.synchronize()
                t[name].append(time.perf_counter() - t0)
        p, f = statistics.median(t["plain"][1:]), statistics.median(t["find"][1:])  # first round warms up
        what = "model only (decoded tensors)" if pre else "end to end (PNG decoding included)"
        rows.append(f"| discovery vs plain forward, 64 images, {what} | float32 | {batch} | {1000 * p:.0f} (plain) | "
                    f"{1000 * f:.0f} (discovery) | {f / p:.3f} |")
    return rows


def main() -> None:
    import torch

    from surgery.core.bake import baked_copy
    from surgery.backends import adapter_for
    from surgery.core.recipe import Recipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=20)
    a = ap.parse_args()
    dev = a.device
    if not dev.startswith("cuda") or not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device")
    source = build_vitb(0, plant=True).to(dev)
    fam = adapter_for(source)
    baked = baked_copy(source, Recipe(BENCH_RECIPE), adapter=fam)
    rows = ["| arm | dtype | batch | original ms | baked ms | baked / original |", "|---|---|---|---|---|---|"]
    with torch.inference_mode():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            s, b = copy.deepcopy(source).to(dtype), copy.deepcopy(baked).to(dtype)  # cast, no autocast
            for bs in (1, a.batch):
                xd = torch.randn(bs, 3, 224, 224, device=dev, dtype=dtype)
                for _ in range(3):
                    s.forward_features(xd), b.forward_features(xd)
                t_s, t_b = [], []
                for r in range(a.rounds):
                    order = [(s, t_s), (b, t_b)] if r % 2 == 0 else [(b, t_b), (s, t_s)]
                    for m, acc in order:
                        acc.append(cuda_ms(lambda m=m: m.forward_features(xd), 1))
                ms_s, ms_b = statistics.median(t_s), statistics.median(t_b)
                rows.append(f"| forward_features | {str(dtype)[6:]} | {bs} | {ms_s:.2f} | {ms_b:.2f} | {ms_b / ms_s:.3f} |")
            del s, b
    rows += discovery_rows(source, fam, dev, a.batch, a.rounds)
    print(f"machine: {machine()}, {torch.cuda.get_device_name()}; date {today()}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
