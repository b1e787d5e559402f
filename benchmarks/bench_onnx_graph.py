"""Latency of an ONNX model with test-time registers baked in by the graph rewriter (issue 16), vs the original.

Model: timm `vit_base_patch16_clip_224` (ViT-B/16, 197 tokens), random weights, exported as a user would
have it (surgery.exporters.onnx_export.export_graph of the *unbaked* model: dynamo exporter, opset 18, dynamic
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

With --variants (issue 25): the same ViT-B/16 file and its precision variants made by onnxruntime's tools
(fp32 itself, all-float16, float16 with float32 I/O, dynamic INT8 per-tensor and per-channel, 4-bit
MatMulNBits), each rewritten by `convert_onnx` with the same recipe; latency of each rewritten variant against
its source variant, all in one run (section "ONNX graph rewrite: precision variants").
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
    ap.add_argument("--variants", action="store_true", help="time the precision variants instead (issue 25)")
    a = ap.parse_args()
    pinned = bl.pin_malloc(not a.no_pin_malloc)
    if a.variants:
        return variants_main(a, pinned)

    import numpy as np
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort
    import torch

    from surgery.exporters.onnx_export import export_graph
    from surgery import Recipe
    from surgery.core.bake import baked_copy
    from surgery.backends import adapter_for
    from surgery.onnx_graph.bake import NodeBuilder, insert_registers, remake_side_tensors, shift_token_constants, \
        side_tensors
    from surgery.onnx_graph.convert import convert_onnx
    from surgery.onnx_graph.discover import measure_layout
    from surgery.onnx_graph.recognise import recognise
    from surgery.core.parity import OutputError

    t_start = time.perf_counter()
    load_start = bl.load_average()
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
        side = side_tensors(vit, layout)
        b = NodeBuilder(vit.model.graph, "token_only")
        entry = insert_registers(b, vit, layout, 1, np.float32)
        own = {id(n) for n in b.nodes}
        b.commit()
        shift_token_constants(b, entry, layout, 1, own)
        remake_side_tensors(b, side, layout, 1)
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
        "weights) exported unbaked with `surgery.exporters.onnx_export.export_graph` (dynamo, opset 18, dynamic batch); "
        f"rewritten with {recipe.num_neurons} register neurons in blocks {sorted(recipe.neurons)} (R=1). "
        "`own export` = vit-surgery's baked export of the same PyTorch model; `token only` = the original graph "
        "with just the register token inserted (the extra token's own cost, the target). "
        f"Threads: {a.threads}; {a.warmup} warm-up calls per arm, {a.rounds} interleaved rounds; process CPU time; "
        f"{bl.malloc_note(pinned)}; times are medians, ratios medians of per-round ratios.\n\n"
        + "\n".join(lines) + "\n\n"
        f"- Rewrite (`convert_onnx`, recognition + bake + save): {rewrite_s:.1f} s.\n"
        "- Rewritten vs own export before timing (worst per-vector relative error, pooled and tokens): "
        + "; ".join(f"batch {bs}: {w:.2g}" for bs, w in checks) + ".\n"
        f"- Whole run: {total:.0f} s; load average at the start: {load_start}.\n" + bl.context_lines()
    )
    print(body)
    if a.write:
        bl.write_section("ONNX graph rewrite", body)
        print(f"wrote section 'ONNX graph rewrite' of {bl.RESULTS}", file=sys.stderr)
    return 0


VARIANTS = ("fp32", "fp16", "fp16_io32", "int8_per_tensor", "int8_per_channel", "q4")


def variants_main(a: argparse.Namespace, pinned: bool) -> int:
    import onnx
    import onnxruntime as ort
    import torch

    from surgery.exporters.onnx_export import export_graph
    from surgery import Recipe
    from surgery.backends import adapter_for
    from surgery.onnx_graph.convert import convert_onnx
    from surgery.organisms.onnx_graphs import make_variant
    from surgery.core.onnx_runtime import as_input

    t_start = time.perf_counter()
    load_start = bl.load_average()
    bl.set_threads(a.threads)
    original = bl.build_vitb(seed=0)
    fam = adapter_for(original)
    recipe = Recipe(bl.BENCH_RECIPE)
    work = bl.work_dir("onnx_graph_variants")
    gen = torch.Generator().manual_seed(0)
    checks = torch.randn(3, 3, 224, 224, generator=gen)
    batches = [checks[:1], checks[1:]]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    rows = []
    try:
        (work / "src").mkdir()
        src = work / "src" / "model.onnx"
        onnx.save_model(export_graph(original, fam, work / "src", progress=False).proto, str(src))
        for kind in VARIANTS:
            variant = src if kind == "fp32" else make_variant(src, work / "src" / f"model_{kind}.onnx", kind,
                                                               num_heads=12, hidden_size=768)
            t = time.perf_counter()
            res = convert_onnx(variant, work / f"out_{kind}", recipe, check_batches=batches)
            rewrite_s = time.perf_counter() - t
            sessions = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
                        for k, p in (("source", variant), ("rewritten", res.out))}
            for bs in a.batches:
                xn = torch.randn(bs, 3, 224, 224, generator=gen).numpy()
                arms = {k: (lambda s=s: s.run(None, {"pixel_values": as_input(s, xn)})) for k, s in sessions.items()}
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
                rows.append((kind, bs, med, bl.paired_ratio(times["rewritten"], times["source"]),
                             res.report.worst.relative, res.report.tolerance, rewrite_s))
                print(f"{kind} batch {bs}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in med.items()),
                      file=sys.stderr)
            del sessions
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t_start
    lines = ["| variant | batch | source | rewritten | rewritten / source | check vs own hooked reference | rewrite |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, bs, med, ratio, err, tol, rewrite_s in rows:
        lines.append(f"| {kind} | {bs} | {med['source'] * 1000:.0f} ms | {med['rewritten'] * 1000:.0f} ms "
                     f"| {ratio:.3f} | {err:.1e} (tol {tol:g}) | {rewrite_s:.1f} s |")
    body = (
        "The ViT-B/16 file of section \"ONNX graph rewrite\" (`fp32`) and each precision variant made from it by "
        "onnxruntime's own tools (`convert_float_to_float16`: `fp16` all-float16, `fp16_io32` with "
        "`keep_io_types=True`; `quantize_dynamic` per-tensor uint8 and per-channel int8; `MatMulNBitsQuantizer` "
        "block 32 symmetric: `q4`), rewritten by `convert_onnx` with the same "
        f"{recipe.num_neurons} register neurons (R=1) and checked against the hooked reference on that variant "
        "(batches 1 and 2, random pixels), then timed against the variant itself in onnxruntime (CPU provider, "
        f"optimisation level ALL). Threads: {a.threads}; {a.warmup} warm-up calls per arm, {a.rounds} "
        f"interleaved rounds; process CPU time; {bl.malloc_note(pinned)}; times are medians, ratios medians of "
        "per-round ratios. The rewritten file carries one more token (the register) than its source.\n\n"
        + "\n".join(lines) + "\n\n"
        f"- Whole run: {total:.0f} s; load average at the start: {load_start}.\n" + bl.context_lines()
    )
    print(body)
    if a.write:
        bl.write_section("ONNX graph rewrite: precision variants", body)
        print(f"wrote section 'ONNX graph rewrite: precision variants' of {bl.RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
