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


def main() -> None:
    import torch

    from surgery.core.bake import bake_registers
    from surgery.core.discovery import DiscoveryConfig, find_register_neurons
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
    baked = bake_registers(copy.deepcopy(source), Recipe(BENCH_RECIPE), adapter=fam)
    x = torch.randn(a.batch, 3, 224, 224, device=dev)
    rows = ["| arm | dtype | ms / batch of %d |" % a.batch, "|---|---|---|"]
    with torch.inference_mode():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            s, b = copy.deepcopy(source).to(dtype), copy.deepcopy(baked).to(dtype)
            xd = x.to(dtype)
            for _ in range(3):
                s.forward_features(xd), b.forward_features(xd)
            t_s, t_b = [], []
            for r in range(a.rounds):
                order = [(s, t_s), (b, t_b)] if r % 2 == 0 else [(b, t_b), (s, t_s)]
                for m, acc in order:
                    acc.append(cuda_ms(lambda m=m: m.forward_features(xd), 1))
            rows.append(f"| original | {str(dtype)[6:]} | {statistics.median(t_s):.2f} |")
            rows.append(f"| baked | {str(dtype)[6:]} | {statistics.median(t_b):.2f} |")
            del s, b
    imgs = work_dir("gpu") / "imgs"
    write_images(imgs, 64)
    import time

    t = time.perf_counter()
    find_register_neurons(source, sorted(imgs.glob("*.png")), DiscoveryConfig(batch_size=a.batch), adapter=fam,
                          progress=False)
    torch.cuda.synchronize()
    t_find = time.perf_counter() - t
    with torch.inference_mode():
        xs = torch.randn(64, 3, 224, 224, device=dev)
        t = time.perf_counter()
        for i in range(0, 64, a.batch):
            source.forward_features(xs[i:i + a.batch])
        torch.cuda.synchronize()
        t_fwd = time.perf_counter() - t
    rows.append(f"| discovery, 64 images (incl. image decoding) | float32 | {1000 * t_find:.0f} total |")
    rows.append(f"| plain forward, 64 images | float32 | {1000 * t_fwd:.0f} total |")
    print(f"machine: {machine()}, {torch.cuda.get_device_name()}; date {today()}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
