"""OpenVINO (CPU plugin, f32) next to onnxruntime and PyTorch eager, baked and original model (issue 12).

Model: timm `vit_base_patch16_clip_224` (ViT-B/16, 197 tokens), random weights, baked with
benchlib.BENCH_RECIPE (~10 register neurons in blocks <= 5). Each model is exported once the way
`vit-surgery export` does it (surgery.exporters.onnx_export.export_graph: dynamo, opset 18, batch 2, dynamic
batch); onnxruntime runs that graph (CPU provider, optimisation ALL) and OpenVINO runs the IR converted
from it exactly as `vit-surgery export --format openvino` converts it (`openvino.convert_model`,
compiled on CPU with INFERENCE_PRECISION_HINT=f32, the hint the export validates with).

One thread per runtime (torch.set_num_threads, ORT intra_op 1, OpenVINO INFERENCE_NUM_THREADS 1; the
shared 2-core machine makes 2 threads stall each other, see the ONNX section). Per batch size the six
arms run interleaved after warm-up, rounds alternating order; times are process CPU time, medians;
ratios are medians of per-round ratios. Outputs are checked against PyTorch before timing.

    .venv/bin/python benchmarks/bench_openvino.py [--rounds 7] [--warmup 2] [--batches 1 8] [--write]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time

import benchlib as bl


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--write", action="store_true", help="replace the 'OpenVINO' section of RESULTS.md")
    a = ap.parse_args()
    pinned = bl.pin_malloc(True)

    import onnxruntime as ort
    import openvino as ov
    import torch

    from surgery import Recipe
    from surgery.core.bake import baked_copy
    from surgery.backends import adapter_for

    t_start = time.perf_counter()
    bl.set_threads(a.threads)
    original = bl.build_vitb(seed=0)
    fam = adapter_for(original)
    recipe = Recipe(bl.BENCH_RECIPE)
    baked = baked_copy(original, recipe, adapter=fam)
    models = {"original": original, "baked": baked}
    core = ov.Core()
    ort_s, ov_c = {}, {}
    work = bl.work_dir("openvino")
    try:
        for name, model in models.items():
            scratch = work / name
            scratch.mkdir()
            path, _ = bl.export_onnx_file(model, fam, scratch)
            ort_s[name] = bl.ort_session(path, a.threads)
            ov.save_model(ov.convert_model(str(path)), str(scratch / "openvino_model.xml"), compress_to_fp16=False)
            ov_c[name] = core.compile_model(core.read_model(str(scratch / "openvino_model.xml")), "CPU",
                                            {"INFERENCE_PRECISION_HINT": "f32",
                                             "INFERENCE_NUM_THREADS": a.threads, "NUM_STREAMS": 1})
            print(f"exported and converted {name}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows, checks = [], []
    gen = torch.Generator().manual_seed(0)
    for bs in a.batches:
        x = torch.randn(bs, 3, 224, 224, generator=gen)
        xn = x.numpy()

        def ov_arm(c):
            req = c.create_infer_request()

            def f():
                res = req.infer({0: xn})
                return [res[c.output("pooled")], res[c.output("tokens")]]
            return f

        arms = {}
        for m in models:
            arms.update({f"torch {m}": bl.torch_arm(fam, models[m], x), f"ort {m}": bl.ort_arm(ort_s[m], xn),
                         f"openvino {m}": ov_arm(ov_c[m])})
        for m in models:  # correctness before speed
            want = arms[f"torch {m}"]()
            for rt in ("ort", "openvino"):
                checks.append((bs, rt, m, bl.worst_relative_error(want, arms[f"{rt} {m}"]())))
        times, med = bl.time_arms(arms, a.warmup, a.rounds)
        rows.append({"batch": bs, "median_s": med,
                     "ov_over_ort_baked": bl.paired_ratio(times["openvino baked"], times["ort baked"]),
                     "ov_over_torch_baked": bl.paired_ratio(times["openvino baked"], times["torch baked"]),
                     "baked_over_original_ov": bl.paired_ratio(times["openvino baked"], times["openvino original"])})
        print(f"batch {bs}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in med.items()), file=sys.stderr)
    total = time.perf_counter() - t_start
    lines = ["| batch | torch original | torch baked | ort original | ort baked | OpenVINO original | OpenVINO baked "
             "| OpenVINO / ort, baked | OpenVINO / torch, baked | baked / original, OpenVINO |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["median_s"]
        lines.append(f"| {r['batch']} | " + " | ".join(f"{m[k] * 1000:.0f} ms" for k in (
            "torch original", "torch baked", "ort original", "ort baked", "openvino original", "openvino baked"))
            + f" | {r['ov_over_ort_baked']:.3f} | {r['ov_over_torch_baked']:.3f} | {r['baked_over_original_ov']:.3f} |")
    check_txt = "; ".join(f"batch {bs} {rt} {m}: {w:.2g}" for bs, rt, m, w in checks)
    body = (
        f"OpenVINO {ov.__version__} (CPU plugin, INFERENCE_PRECISION_HINT f32) next to onnxruntime "
        f"{ort.__version__} (CPU, optimisation ALL) and PyTorch {torch.__version__} eager (inference_mode). "
        f"ViT-B/16 (`{bl.ARCH}`, random weights), baked with {recipe.num_neurons} register neurons in blocks "
        f"{sorted(recipe.neurons)} (R=1); the IR is converted from the same ONNX graph (`openvino.convert_model`), "
        f"as `vit-surgery export --format openvino` does. {a.threads} thread per runtime; {a.warmup} warm-up "
        f"calls per arm, {a.rounds} interleaved rounds; process CPU time, {bl.malloc_note(pinned)}; medians, "
        "ratios medians of per-round ratios (< 1: OpenVINO faster).\n\n" + "\n".join(lines) + "\n\n"
        f"- Outputs vs PyTorch before timing (worst per-vector relative error, pooled and tokens): {check_txt}.\n"
        f"- Whole run: {total:.0f} s.\n" + bl.context_lines())
    print(body)
    if a.write:
        bl.write_section("OpenVINO", body)
        print(f"wrote section 'OpenVINO' of {bl.RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
