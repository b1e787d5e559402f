"""A naive reference-style discovery pipeline vs `find_register_neurons`, on the same images.

The naive pipeline is written here, after the structure the paper's public code uses (no code taken
from it): one image at a time; forward hooks copy every block's output and every block's MLP hidden
activations to host numpy arrays; after all images are through, norms, outlier positions and
per-unit scores are computed from the stored arrays. Its rule matches ours (outliers: norm > 2.5 x
the image's median patch-token norm at the last block, CLS excluded; score = mean |activation| at the
outlier positions, averaged over images with outliers; blocks <= 5; top 10), so both must find the
same units; only the execution differs. Ours: batch 8, statistics reduced per batch in torch.

Reported: wall and CPU time (interleaved rounds), the speed-up, agreement of the top-10 units, and
peak memory of each pipeline in a fresh child process (the naive one grows with the image count).

    .venv/bin/python benchmarks/bench_naive.py [--write]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import benchlib as bl

MAX_LAYER = 5
TOP_K = 10
AUTO_FACTOR = 2.5


def naive_find(model, files, transform, max_layer: int = MAX_LAYER, top_k: int = TOP_K):
    """Reference-style: batch 1, every layer's activations copied to numpy, scoring afterwards."""
    import torch

    from surgery.core.images import load_image

    blocks = list(model.blocks)
    p = int(model.num_prefix_tokens)
    block_out: list[list[np.ndarray]] = [[] for _ in blocks]
    mlp_hidden: list[list[np.ndarray]] = [[] for _ in blocks]
    handles = []
    for i, blk in enumerate(blocks):
        handles.append(blk.register_forward_hook(
            lambda _m, _a, out, i=i: block_out[i].append(out.detach().cpu().numpy().copy())))
        handles.append(blk.mlp.fc2.register_forward_pre_hook(
            lambda _m, args, i=i: mlp_hidden[i].append(args[0].detach().cpu().numpy().copy())))
    try:
        with torch.no_grad():
            for f in files:
                x = transform(load_image(Path(f))).unsqueeze(0)
                model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    detect = len(blocks) - 1
    scores = np.zeros((max_layer + 1, mlp_hidden[0][0].shape[-1]))
    n_with = 0
    for img in range(len(files)):
        norms = np.linalg.norm(block_out[detect][img][0], axis=-1)  # [N]
        thr = AUTO_FACTOR * np.median(norms[p:])
        pos = np.nonzero(norms > thr)[0]
        pos = pos[pos >= p]
        if len(pos) == 0:
            continue
        n_with += 1
        for layer in range(max_layer + 1):
            scores[layer] += np.abs(mlp_hidden[layer][img][0][pos]).mean(axis=0)
    scores /= max(n_with, 1)
    flat = scores.ravel()
    order = np.lexsort((np.arange(flat.size), -flat))[:top_k]
    return [(int(i // scores.shape[1]), int(i % scores.shape[1])) for i in order]


def ours_find(model, files, batch_size: int = 8):
    from surgery.backends import adapter_for
    from surgery.core.discovery import DiscoveryConfig, find_register_neurons

    res = find_register_neurons(model, files, DiscoveryConfig(max_layer=MAX_LAYER, top_k=TOP_K,
                                                              batch_size=batch_size), progress=False, adapter=adapter_for(model))
    return [(r["layer"], r["unit"]) for r in res.ranking[:TOP_K]]


def child_memory(args) -> None:
    bl.set_threads(args.threads[0])
    import torch

    from surgery.backends import adapter_for

    model = bl.build_vitb(plant=True)
    files = sorted(Path(args.images_dir).glob("*.png"))[: args.images]
    with torch.inference_mode():
        model.forward_features(torch.zeros(args.batch_size, 3, 224, 224))
    base = bl.rss_mib()
    bl.reset_peak_rss()
    if args.mode == "naive":
        naive_find(model, files, adapter_for(model).data_transform(model))
    else:
        ours_find(model, files, args.batch_size)
    print(json.dumps({"base_mib": base, "peak_mib": bl.peak_rss_mib()}))


def run_child(mode: str, images_dir: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child-memory", "--images-dir", str(images_dir), "--mode", mode,
           "--threads", str(args.threads[0]), "--batch-size", str(args.batch_size), "--images", str(args.images)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=bl.default_malloc_env()).stdout
    res = json.loads(out.strip().splitlines()[-1])
    print(f"  memory child {mode}: peak RSS {res['peak_mib']:.0f} MiB (before the run {res['base_mib']:.0f} MiB)",
          flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8, help="our pipeline's batch size")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="torch thread counts to time (1: CPU time is judged; more: wall clock)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--write", action="store_true", help="write the 'Naive pipeline' section of benchmarks/RESULTS.md")
    ap.add_argument("--note", default="")
    ap.add_argument("--no-pin-malloc", action="store_true", help="keep glibc's default malloc thresholds for timing")
    ap.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--images-dir", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="ours", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_memory:
        return child_memory(args)
    pinned = bl.pin_malloc(not args.no_pin_malloc)
    bl.set_threads(args.threads[0])
    import torch

    from surgery.backends import adapter_for

    work = bl.work_dir("naive")
    files = bl.write_images(work, args.images)
    model = bl.build_vitb(plant=True)
    tf = adapter_for(model).data_transform(model)
    with torch.inference_mode():
        model.forward_features(torch.zeros(args.batch_size, 3, 224, 224))
    found: dict[str, list] = {}
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        t = bl.interleave({"naive": lambda: found.__setitem__("naive", naive_find(model, files, tf)),
                           "ours": lambda: found.__setitem__("ours", ours_find(model, files, args.batch_size))},
                          args.rounds)
        for clock in ("cpu", "wall"):
            n, o = t[clock]["naive"], t[clock]["ours"]
            primary = (clock == "cpu") == (threads == 1)
            speedup = bl.paired_ratio(n, o)
            sp = f"**{speedup:.2f}x**" if primary else f"{speedup:.2f}x"
            rows.append(f"| {threads} | {clock} | {bl.median(n):.1f} | {bl.median(o):.1f} | "
                        f"{args.images / bl.median(n):.2f} | {args.images / bl.median(o):.2f} | {sp} | "
                        f"{[round(a / b, 2) for a, b in zip(n, o)]} |")
            print(rows[-1], flush=True)
    agree = len(set(found["naive"]) & set(found["ours"]))
    print(f"top-{TOP_K} agreement: {agree}/{TOP_K}; naive {found['naive']}, ours {found['ours']}", flush=True)
    mem = ""
    if not args.skip_memory:
        mn, mo = run_child("naive", work, args), run_child("ours", work, args)
        act_mb = args.images * 12 * 197 * (3072 + 768) * 4 / 1e6
        mem = (f"\nPeak memory over the run ({args.images} images, fresh child process each, VmHWM reset after the "
               f"model was built): naive {mn['peak_mib']:.0f} MiB (+{mn['peak_mib'] - mn['base_mib']:.0f} MiB over "
               f"the {mn['base_mib']:.0f} MiB before the run), ours {mo['peak_mib']:.0f} MiB "
               f"(+{mo['peak_mib'] - mo['base_mib']:.0f} MiB). The naive pipeline keeps every activation: "
               f"{args.images} x 12 blocks x 197 tokens x (3072 + 768) fp32 = {act_mb:.0f} MB, growing linearly with "
               "the image count; ours is flat (see 'Discovery').\n")
    body = (bl.context_lines(f"\n- Timing: {bl.malloc_note(pinned)}; memory children: default malloc")
            + (f"- Note: {args.note}\n" if args.note else "") +
            f"\nSame {args.images} images (224-px organism PNGs, decoded inside both pipelines), same model "
            f"(ViT-B/16, random weights, planted units), same rule (auto threshold, blocks ≤ {MAX_LAYER}, "
            f"top {TOP_K}); {args.rounds} interleaved rounds, speed-up = median of per-round naive/ours time ratios. "
            f"torch threads {args.threads} (with 1 thread the CPU-time row is the measure, with more the wall-clock "
            f"row; the machine's other jobs make 2-thread wall times noisier); naive: batch 1, hooks copying all 12 blocks' outputs and MLP hidden "
            f"activations to numpy, scoring afterwards; ours: `find_register_neurons`, batch {args.batch_size}.\n\n"
            "| threads | clock | naive s (median) | ours s (median) | naive img/s | ours img/s | speed-up | per-round |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            f"Top-{TOP_K} units agree: {agree}/{TOP_K}.\n" + mem)
    print(body)
    if args.write:
        bl.write_section("Naive pipeline", body)
        print(f"wrote section 'Naive pipeline' of {bl.RESULTS}")


if __name__ == "__main__":
    main()
