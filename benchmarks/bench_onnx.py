"""onnxruntime vs PyTorch eager, for the baked model and for the original model (issue 3).

Model: timm `vit_base_patch16_clip_224` (ViT-B/16, 197 tokens), random weights (pretrained=False),
baked with ~10 register neurons in blocks <= 5 (benchlib.BENCH_RECIPE). Both models are exported the
way `vit-surgery export` does it (surgery.exporters.onnx_export.export_graph: dynamo exporter, opset 18, batch 2,
dynamic batch axis) and run in onnxruntime on the CPU provider with graph optimisation level ALL.

Per batch size (1 and 8) the four arms (torch original, torch baked, ort original, ort baked) run
interleaved, a few warm-up calls each and then R timed rounds in alternating order, so machine drift
hits every arm alike. Ratios are medians of per-round ratios. Torch and onnxruntime get the same
number of threads (1 by default: on the shared 2-core machine, other jobs keep the cores busy and
two OpenMP threads stall each other: PyTorch ViT-B batch 1 took 1.5 s with 2 threads, 0.39 s with 1).
Outputs are checked against PyTorch before timing.

    .venv/bin/python benchmarks/bench_onnx.py [--rounds 5] [--warmup 2] [--threads 1] [--write]
"""
from __future__ import annotations

import argparse
import copy
import shutil
import sys
import time

import benchlib as bl


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for torch and onnxruntime (default 1: on the shared 2-core machine two "
                         "OpenMP threads stall each other; see RESULTS.md)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo")
    ap.add_argument("--write", action="store_true", help="replace the 'ONNX export' section of RESULTS.md")
    ap.add_argument("--no-pin-malloc", action="store_true", help="keep glibc's default malloc thresholds")
    a = ap.parse_args()
    pinned = bl.pin_malloc(not a.no_pin_malloc)

    import torch

    from surgery import Recipe
    from surgery.core.bake import baked_copy
    from surgery.backends import adapter_for
    from surgery.core.modules import PrependRegisters

    t_start = time.perf_counter()
    bl.set_threads(a.threads)
    original = bl.build_vitb(seed=0)
    fam = adapter_for(original)
    recipe = Recipe(bl.BENCH_RECIPE)
    baked = baked_copy(original, recipe, adapter=fam)
    # token only: the register token inserted, no split MLP (the extra token's own cost)
    token = copy.deepcopy(original)
    parent, attr = fam.insertion_point(token)
    p = fam.num_prefix_tokens(token)
    setattr(parent, attr, PrependRegisters(getattr(parent, attr), 1, fam.embed_dim(token), p))
    fam.set_num_prefix_tokens(token, p + 1)
    work = bl.work_dir("onnx")
    sessions, export_s = {}, {}
    try:
        for name, model in (("original", original), ("baked", baked), ("token", token)):
            scratch = work / name
            scratch.mkdir()
            t = time.perf_counter()
            path, used = bl.export_onnx_file(model, fam, scratch, a.exporter)
            export_s[name] = time.perf_counter() - t
            sessions[name] = bl.ort_session(path, a.threads)
            print(f"exported {name} with {used} in {export_s[name]:.1f}s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    models = {"original": original, "baked": baked}
    rows, checks = [], []
    gen = torch.Generator().manual_seed(0)
    for bs in a.batches:
        x = torch.randn(bs, 3, 224, 224, generator=gen)
        xn = x.numpy()
        arms = {"torch original": bl.torch_arm(fam, original, x), "torch baked": bl.torch_arm(fam, baked, x),
                "ort original": bl.ort_arm(sessions["original"], xn), "ort baked": bl.ort_arm(sessions["baked"], xn),
                "ort token": bl.ort_arm(sessions["token"], xn)}
        for name in models:  # correctness before speed
            checks.append((bs, name, bl.worst_relative_error(arms[f"torch {name}"](), arms[f"ort {name}"]())))
        times, med = bl.time_arms(arms, a.warmup, a.rounds)
        rows.append({
            "batch": bs, "median_s": med,
            "ort_speedup_original": bl.paired_ratio(times["torch original"], times["ort original"]),
            "ort_speedup_baked": bl.paired_ratio(times["torch baked"], times["ort baked"]),
            "baked_over_original_torch": bl.paired_ratio(times["torch baked"], times["torch original"]),
            "baked_over_original_ort": bl.paired_ratio(times["ort baked"], times["ort original"]),
            "token_over_original_ort": bl.paired_ratio(times["ort token"], times["ort original"]),
            "baked_over_token_ort": bl.paired_ratio(times["ort baked"], times["ort token"]),
        })
        print(f"batch {bs}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in med.items()), file=sys.stderr)
    total = time.perf_counter() - t_start

    lines = [
        "| batch | torch eager original | torch eager baked | ort original | ort baked "
        "| ort speed-up, original (torch/ort) | ort speed-up, baked (torch/ort) "
        "| baked / original, torch | baked / original, ort | token only / original, ort | baked / token only, ort |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r["median_s"]
        lines.append(f"| {r['batch']} | {m['torch original'] * 1000:.0f} ms | {m['torch baked'] * 1000:.0f} ms "
                     f"| {m['ort original'] * 1000:.0f} ms | {m['ort baked'] * 1000:.0f} ms "
                     f"| {r['ort_speedup_original']:.2f}x | {r['ort_speedup_baked']:.2f}x "
                     f"| {r['baked_over_original_torch']:.3f} | {r['baked_over_original_ort']:.3f} "
                     f"| {r['token_over_original_ort']:.3f} | {r['baked_over_token_ort']:.3f} |")
    table = "\n".join(lines)
    check_txt = "; ".join(f"batch {bs} {n}: {w:.2g}" for bs, n, w in checks)
    body = (
        "onnxruntime (CPU provider, graph optimisation level ALL) against PyTorch eager (inference_mode), "
        f"for the baked and the original model. ViT-B/16 (`{bl.ARCH}`, random weights), baked with "
        f"{recipe.num_neurons} register neurons in blocks {sorted(recipe.neurons)} (R=1). Both exported with "
        f"`surgery.exporters.onnx_export.export_graph` ({a.exporter} exporter, opset 18, export batch 2, dynamic batch). "
        f"Threads: {a.threads} for torch and for onnxruntime (one thread by default: other jobs share the "
        "2 cores, and two OpenMP threads then stall each other, e.g. PyTorch ViT-B batch 1 took 1.5 s with 2 "
        f"threads against 0.39 s with 1). {a.warmup} warm-up calls per arm, then {a.rounds} interleaved rounds; "
        f"times are process CPU time (one thread), {bl.malloc_note(pinned)}; "
        "times are medians, ratios medians of per-round ratios (speed-up > 1: onnxruntime faster; "
        "baked / original > 1: the fix costs time; `token only` = the original with just the register token "
        "inserted, no split MLP: the extra token's own cost, which the method cannot avoid).\n\n"
        f"{table}\n\n"
        f"- Export time: original {export_s['original']:.1f} s, baked {export_s['baked']:.1f} s.\n"
        f"- onnxruntime vs PyTorch before timing (worst per-vector relative error, pooled and tokens): {check_txt}.\n"
        f"- Whole run: {total:.0f} s.\n"
        + bl.context_lines()
    )
    print(body)
    if a.write:
        bl.write_section("ONNX export", body)
        print(f"wrote section 'ONNX export' of {bl.RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
