"""Eager launch cost of the fix as a count of dispatched ops, and the ONNX graph's node count (issue 32).

On a GPU at small batch every aten op of an eager forward is a kernel launch, so the number of ops one
eager `forward_features` dispatches tracks the eager baked / original ratio without a GPU. Counted on the
CPU with `TorchDispatchMode` (tests/helpers/op_count.py: view ops left out), for ViT-B/16 (`vit_base_patch16_clip_224`,
random weights) baked with benchlib.BENCH_RECIPE (10 units in 4 blocks, R = 1), in float32, bfloat16 and
float16: the whole forward, one baked block's MLP against the original MLP, and the register token (the
inserter against the pre-norm it wraps). The count does not depend on the batch size.

ONNX: the original and the baked model exported as `vit-surgery export` does (dynamo exporter, the register
branch's tail-accurate activation), nodes counted by op type; "compute nodes" leave out metadata nodes and
the ops whose PyTorch counterpart is a view (ONNX_VIEW_OPS), as the eager count leaves out views. Checked
in onnxruntime at batch 1 and 3 against PyTorch (dynamic batch axis).

    python benchmarks/bench_eager_ops.py [--no-onnx] [--write]
"""
from __future__ import annotations

import argparse
import copy
import shutil
import sys
from collections import Counter

import benchlib as bl

from tests.helpers.op_count import dispatched_ops  # noqa: E402  (shared with the op-count tests; benchlib puts the root on sys.path)

DTYPES = ("float32", "bfloat16", "float16")
# ONNX nodes left out of "compute nodes", as the eager count leaves out views: metadata (Constant, Shape,
# Identity) and the ops whose PyTorch counterpart is a view (reshape, slice, expand, transpose)
ONNX_VIEW_OPS = frozenset({"Constant", "Shape", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Slice",
                           "Expand", "Transpose"})
# before this issue (commit c126580, counted the same way): whole forward_features of the baked model
BEFORE = {"float32": 166, "bfloat16": 190, "float16": 190}
# and the ONNX graph's extra nodes then (Slice 14, Add 12, Reshape 12, Concat 11, MatMul 8, Mul 8, Expand 5,
# Abs 4, ArgMax 4, Div 4, Erf 4, GatherElements 4)
BEFORE_ONNX_EXTRA = {"nodes": 90, "compute": 59}
# the previous layout (commit 5444a9a: the branch's own k-row fc1 GEMM and activation, 7 ops per baked block)
PREVIOUS = {"float32": 154, "bfloat16": 154, "float16": 154}
TARGET_BLOCK, TARGET_TOKEN = 6, 2  # issue 32: extra ops per baked block, and for the register token


def _fmt(c: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def count_eager(original, baked, fam, layers: list[int]) -> list[dict]:
    import torch

    rows = []
    x = torch.randn(1, 3, 224, 224)
    for name in DTYPES:
        dt = getattr(torch, name)
        o, b = copy.deepcopy(original).to(dt), copy.deepcopy(baked).to(dt)
        xo = x.to(dt)
        whole_o, whole_b = dispatched_ops(o.forward_features, xo), dispatched_ops(b.forward_features, xo)
        tokens = torch.randn(1, 198, fam.embed_dim(o), dtype=dt)
        per_block = {}
        for layer in layers:
            mlp_o = dispatched_ops(fam.get_mlp(fam.blocks(o)[layer]), tokens)
            mlp_b = dispatched_ops(fam.get_mlp(fam.blocks(b)[layer]), tokens)
            per_block[layer] = sum(mlp_b.values()) - sum(mlp_o.values())
        mlp_o = dispatched_ops(fam.get_mlp(fam.blocks(o)[layers[0]]), tokens)
        mlp_b = dispatched_ops(fam.get_mlp(fam.blocks(b)[layers[0]]), tokens)
        parent, attr = fam.insertion_point(b)
        inserter = getattr(parent, attr)
        pre_o = dispatched_ops(inserter.inner, tokens[:, 1:])
        pre_b = dispatched_ops(inserter, tokens[:, 1:])
        rows.append({"dtype": name, "original": sum(whole_o.values()), "baked": sum(whole_b.values()),
                     "extra": whole_b - whole_o, "block_extra": sum(mlp_b.values()) - sum(mlp_o.values()),
                     "block_ops": mlp_b - mlp_o, "token_extra": sum(pre_b.values()) - sum(pre_o.values()),
                     "token_ops": pre_b - pre_o, "blocks": per_block})
        print(f"{name}: original {rows[-1]['original']}, baked {rows[-1]['baked']} (+{_fmt(rows[-1]['extra'])})",
              file=sys.stderr)
    return rows


def count_onnx(original, baked, fam) -> dict:
    import onnx
    import torch

    work = bl.work_dir("eager-ops")
    out = {}
    try:
        for name, model in (("original", original), ("baked", baked)):
            d = work / name
            d.mkdir()
            path, exporter = bl.export_onnx_file(model, fam, d)
            proto = onnx.load(str(path))
            ops = Counter(n.op_type for n in proto.graph.node)
            sess = bl.ort_session(path, 1)
            worst = 0.0
            for bs in (1, 3):
                x = torch.randn(bs, 3, 224, 224)
                with torch.no_grad():
                    want = fam.forward_both(model, x)
                got = sess.run(["pooled", "tokens"], {"pixel_values": x.numpy()})
                worst = max(worst, bl.worst_relative_error(want, got))
            out[name] = {"exporter": exporter, "nodes": sum(ops.values()),
                         "compute": sum(v for k, v in ops.items() if k not in ONNX_VIEW_OPS), "ops": ops,
                         "worst": worst}
            print(f"ONNX {name}: {out[name]['nodes']} nodes ({out[name]['compute']} compute), onnxruntime vs "
                  f"PyTorch at batch 1 and 3: {worst:.1e}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-onnx", action="store_true", help="eager counts only")
    ap.add_argument("--write", action="store_true", help="replace the 'Eager op count' section of RESULTS.md")
    a = ap.parse_args()

    import torch

    from surgery import Recipe
    from surgery.backends import adapter_for
    from surgery.core.bake import baked_copy

    torch.manual_seed(0)
    original = bl.build_vitb(0)
    fam = adapter_for(original)
    recipe = Recipe(bl.BENCH_RECIPE)
    baked = baked_copy(original, recipe, adapter=fam)
    blocks = len(recipe.neurons)
    rows = count_eager(original, baked, fam, layers=sorted(recipe.neurons))
    lines = ["| dtype | original | baked | baked / original | before (c126580) | previous (5444a9a) | extra per baked "
             "block (MLP), each block | register token | extra ops, whole forward |",
             "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['original']} | {r['baked']} | {r['baked'] / r['original']:.3f} | "
                     f"{BEFORE[r['dtype']]} ({BEFORE[r['dtype']] / r['original']:.3f}) | "
                     f"{PREVIOUS[r['dtype']]} ({PREVIOUS[r['dtype']] / r['original']:.3f}) | "
                     f"{', '.join(f'{layer}: {n}' for layer, n in r['blocks'].items())} | "
                     f"{r['token_extra']} | {_fmt(r['extra'])} |")
    worst_block = max(n for r in rows for n in r["blocks"].values())
    worst_token = max(r["token_extra"] for r in rows)
    met = worst_block <= TARGET_BLOCK and worst_token <= TARGET_TOKEN
    per_block = rows[0]["block_ops"]
    body = ("Aten ops one eager `forward_features` dispatches (batch 1; the count does not depend on it), "
            "counted with `TorchDispatchMode` on the CPU, view ops left out (tests/helpers/op_count.py), ViT-B/16 "
            f"(`{bl.ARCH}`, random weights) baked with {blocks} blocks / "
            f"{sum(len(v) for v in recipe.neurons.values())} units (benchlib.BENCH_RECIPE, R = 1). Per baked "
            "block: the baked MLP against the original MLP on the same tokens; register token: the inserter "
            "against the pre-norm it wraps.\n\n" + "\n".join(lines) + "\n\n"
            f"Per baked block, every dtype: {_fmt(per_block)} (a block with one unit: no index_select, its "
            f"activations are a slice); register token: {_fmt(rows[0]['token_ops'])}. Target (issue 32): at most "
            f"{TARGET_BLOCK} extra ops per baked block and {TARGET_TOKEN} for the register token, in float32 and half "
            f"precision: **{'met' if met else 'NOT met'}** (worst block {worst_block}, token {worst_token}).\n")
    if not a.no_onnx:
        onnx_counts = count_onnx(original, baked, fam)
        o, b = onnx_counts["original"], onnx_counts["baked"]
        extra = b["ops"] - o["ops"]
        body += ("\nONNX (float32, exported as `vit-surgery export` does; compute nodes leave out "
                 f"{', '.join(sorted(ONNX_VIEW_OPS))}):\n\n"
                 "| model | exporter | nodes | compute nodes | onnxruntime vs PyTorch, batch 1 and 3 |\n"
                 "|---|---|---:|---:|---:|\n"
                 f"| original | {o['exporter']} | {o['nodes']} | {o['compute']} | {o['worst']:.1e} |\n"
                 f"| baked | {b['exporter']} | {b['nodes']} | {b['compute']} | {b['worst']:.1e} |\n\n"
                 f"Extra nodes of the baked graph: {b['nodes'] - o['nodes']} ({b['compute'] - o['compute']} compute, "
                 f"{(b['compute'] - o['compute']) / blocks:.1f} per baked block, register token included; before "
                 f"(c126580): {BEFORE_ONNX_EXTRA['nodes']} ({BEFORE_ONNX_EXTRA['compute']} compute)): {_fmt(extra)}. The register branch's activation is "
                 "the tail-accurate sigmoid form (exporters/tail_accurate_activation.py) where the activation has one. "
                 "The export keeps the branch split off (exporters/register_branch_export.py: its own k-row MatMul + "
                 "Add and activation, 7 of these nodes per block with exact GELU): reading the k units from fc1's "
                 "output instead would save ~6 nodes per block, but put the register units' large activations "
                 "into fc2's input, whose one INT8 range per tensor they would then set, and compute the register "
                 "value from a quantized fc1 (`--int8` keeps the split branch float by name). The graph is the "
                 "same as before the eager change (590 nodes).\n")
    body += "\n" + bl.context_lines()
    print(body)
    if a.write:
        bl.write_section("Eager op count (issue 32)", body)
        print(f"wrote section 'Eager op count (issue 32)' of {bl.RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
