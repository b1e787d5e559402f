"""Latency of an ONNX model with test-time registers baked in by the graph rewriter (issue 16), vs the original.

Model: timm `vit_base_patch16_clip_224` (ViT-B/16, 197 tokens), random weights, exported as a user would
have it (exporters.onnx_export.export_graph of the *unbaked* model: dynamo exporter, opset 18, dynamic
batch). Arms, all in onnxruntime (CPU provider, graph optimisation level ALL):
  original   the source file;
  rewritten  `vit-surgery convert model.onnx` (surgery.onnx_graph) with ~10 register neurons in blocks <= 5
             (benchlib.BENCH_RECIPE);
  own export vit-surgery's own baked export of the same PyTorch model (bake in PyTorch, then export);
  token only the source graph with just the register token inserted by the rewriter (no split MLP): the
             extra token's own cost, which the method cannot avoid.
Arms run interleaved (alternating order), a few warm-up calls each, then R timed rounds; process CPU time
with one thread; ratios are medians of per-round ratios. Outputs are checked before timing.

    .venv/bin/python benchmarks/bench_onnx_graph.py [--rounds 9] [--warmup 2] [--threads 1] [--write]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time

import benchlib as bl


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--write", action="store_true", help="replace the 'ONNX graph rewrite' section of RESULTS.md")
    ap.add_argument("--no-pin-malloc", action="store_true", help="keep glibc's default malloc thresholds")
    a = ap.parse_args()
    pinned = bl.pin_malloc(not a.no_pin_malloc)

    import numpy as np
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort
    import torch

    from exporters.onnx_export import export_graph
    from surgery import Recipe
    from surgery.core.bake import baked_copy
    from surgery.backends import adapter_for
    from surgery.onnx_graph.bake import _Builder, _insert_registers, _remake_side_tensors, _shift_token_constants, \
        _side_tensors
    from surgery.onnx_graph.convert import convert_onnx
    from surgery.onnx_graph.discover import measure_layout
    from surgery.onnx_graph.recognise import recognise
    from surgery.core.parity import OutputError

    t_start = time.perf_counter()
    bl.set_threads(a.threads)
    original = bl.build_vitb(seed=0)
    fam = adapter_for(original)
    recipe = Recipe(bl.BENCH_RECIPE)
    work = bl.work_dir("onnx_graph")
    paths = {}
    try:
        (work / "src").mkdir()
        paths["original"] = work / "src" / "model.onnx"
        onnx.save_model(export_graph(original, fam, work / "src", progress=False).proto, str(paths["original"]))
        t = time.perf_counter()
        res = convert_onnx(paths["original"], work / "rewritten", recipe)
        rewrite_s = time.perf_counter() - t
        paths["rewritten"] = res.out
        (work / "own").mkdir()
        baked = baked_copy(original, recipe, adapter=fam)
        paths["own export"] = work / "own" / "model.onnx"
        onnx.save_model(export_graph(baked, fam, work / "own", progress=False).proto, str(paths["own export"]))
        vit = recognise(paths["original"])  # token only: the rewriter's register insertion alone
        layout = measure_layout(vit)
        side = _side_tensors(vit, layout)
        b = _Builder(vit.model.graph, "token_only")
        entry = _insert_registers(b, vit, layout, 1, np.float32)
        own = {id(n) for n in b.nodes}
        b.commit()
        _shift_token_constants(b, entry, layout, 1, own)
        _remake_side_tensors(b, side, layout, 1)
        vit.model.graph.sort()
        paths["token only"] = work / "token.onnx"
        ir.save(vit.model, str(paths["token only"]))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = a.threads
        so.inter_op_num_threads = 1
        sessions = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows, checks = [], []
    gen = torch.Generator().manual_seed(0)
    for bs in a.batches:
        xn = torch.randn(bs, 3, 224, 224, generator=gen).numpy()
        arms = {k: (lambda s=s: s.run(["pooled", "tokens"], {"pixel_values": xn})) for k, s in sessions.items()}
        got, want = arms["rewritten"](), arms["own export"]()
        worst = 0.0
        for o, g, w in zip(("pooled", "tokens"), got, want):
            e = OutputError(o)
            e.update(torch.from_numpy(np.asarray(g)), torch.from_numpy(np.asarray(w)))
            worst = max(worst, e.relative)
        checks.append((bs, worst))
        for _ in range(a.warmup):
            for f in arms.values():
                f()
        times: dict[str, list[float]] = {n: [] for n in arms}
        names = list(arms)
        for r in range(a.rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                t = time.process_time()
                arms[n]()
                times[n].append(time.process_time() - t)
        med = {k: bl.median(v) for k, v in times.items()}
        rows.append((bs, med, {k: bl.paired_ratio(times[k], times["original"]) for k in names},
                     bl.paired_ratio(times["rewritten"], times["token only"])))
        print(f"batch {bs}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in med.items()), file=sys.stderr)
    total = time.perf_counter() - t_start

    lines = ["| batch | original | rewritten | own export | token only | rewritten / original | own export / original "
             "| token only / original | rewritten / token only |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for bs, med, ratio, over_token in rows:
        lines.append(f"| {bs} | {med['original'] * 1000:.0f} ms | {med['rewritten'] * 1000:.0f} ms "
                     f"| {med['own export'] * 1000:.0f} ms | {med['token only'] * 1000:.0f} ms "
                     f"| {ratio['rewritten']:.3f} | {ratio['own export']:.3f} | {ratio['token only']:.3f} "
                     f"| {over_token:.3f} |")
    body = (
        "`vit-surgery convert model.onnx` (graph rewrite with onnx-ir, no PyTorch model) against the original "
        f"ONNX file, in onnxruntime (CPU provider, optimisation level ALL). ViT-B/16 (`{bl.ARCH}`, random "
        "weights) exported unbaked with `exporters.onnx_export.export_graph` (dynamo, opset 18, dynamic batch); "
        f"rewritten with {recipe.num_neurons} register neurons in blocks {sorted(recipe.neurons)} (R=1). "
        "`own export` = vit-surgery's baked export of the same PyTorch model; `token only` = the original graph "
        "with just the register token inserted (the extra token's own cost, the target). "
        f"Threads: {a.threads}; {a.warmup} warm-up calls per arm, {a.rounds} interleaved rounds; process CPU time; "
        f"{bl.malloc_note(pinned)}; times are medians, ratios medians of per-round ratios.\n\n"
        + "\n".join(lines) + "\n\n"
        f"- Rewrite (`convert_onnx`, recognition + bake + save): {rewrite_s:.1f} s.\n"
        "- Rewritten vs own export before timing (worst per-vector relative error, pooled and tokens): "
        + "; ".join(f"batch {bs}: {w:.2g}" for bs, w in checks) + ".\n"
        f"- Whole run: {total:.0f} s.\n" + bl.context_lines()
    )
    print(body)
    if a.write:
        bl.write_section("ONNX graph rewrite", body)
        print(f"wrote section 'ONNX graph rewrite' of {bl.RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
