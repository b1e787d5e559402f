"""INT8 (onnxruntime.quantization) on the original and on the baked ViT-B: fidelity and latency (issue 24).

Does moving the outliers out of the MLP make INT8 better? The same quantizer settings as
`vit-surgery export --int8` (exporters/onnx_int8.py: quant_pre_process, quantize_static QDQ, per-channel
int8 weights, int8 activations with one MinMax range per tensor, MatMul/Gemm/Conv; quantize_dynamic for
`dynamic`) are applied to

  original  timm `vit_base_patch16_clip_224` (ViT-B/16, random weights) with planted register neurons
            whose outliers are as strong as the demo organism's (max/median patch norm at the last block
            ~30 on images with triggers; `--outlier-norm` sets it, the measured ratio is printed);
  baked     the same model with the fix baked in (the planted neurons, R = 1), register branch kept float
            by name (as the exporter does).

Fidelity, INT8 against the float32 graph of the same model (onnxruntime CPU, optimisation ALL), on
images calibration did not see: pooled cosine (mean, min over images), patch-token cosine (mean over
patch tokens, then mean / min over images), cosine of the special token (baked: the register; original:
the high-norm patch tokens), k-NN agreement (pooled: overlap of each image's 5 nearest images by cosine;
patch: overlap of each patch token's 5 nearest patch tokens of the same image, mean).

Range analysis: for every activation tensor the static quantizer calibrates, how much of its per-tensor
range the register row (baked) or the high-norm patch rows (original) take: range over all rows /
range without them. Where the register row dominates, the variant `baked, register row out of the
ranges` recalibrates those ranges without it (TensorQuantOverrides rmin/rmax); the better variant is
reported and adopted.

Latency: INT8 / float32 in onnxruntime CPU (1 thread, process CPU time, interleaved rounds) at batch 1
and 8, for each model.

    python benchmarks/bench_int8.py [--calib 32] [--eval 32] [--rounds 5] [--write]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import benchlib as bl

KNN_K = 5


def _pooled_knn(a, b, k: int = KNN_K) -> float:
    """Mean overlap of each row's k nearest rows (cosine, self excluded) under embeddings a and b."""
    import torch

    def nn_sets(x):
        x = torch.nn.functional.normalize(x.double(), dim=-1)
        s = x @ x.T
        s.fill_diagonal_(-2)
        return s.topk(k, dim=-1).indices

    na, nb = nn_sets(a), nn_sets(b)
    return float(sum(len(set(r.tolist()) & set(q.tolist())) for r, q in zip(na, nb)) / (k * len(na)))


def _patch_knn(a, b, k: int = KNN_K) -> float:
    return float(sum(_pooled_knn(x, y, k) for x, y in zip(a, b)) / len(a))


def _cos(a, b):
    import torch

    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-30)


def fidelity(fp32, int8, first_patch: int, special: list) -> dict:
    """fp32, int8: (pooled [n, E], tokens [n, N, D]) tensors; special: per image, token indices."""
    import torch

    pc = _cos(int8[0], fp32[0])
    tc = _cos(int8[1][:, first_patch:], fp32[1][:, first_patch:]).mean(dim=1)
    sp = [float(_cos(int8[1][i, idx], fp32[1][i, idx]).min()) for i, idx in enumerate(special) if len(idx)]
    return {"pooled_mean": float(pc.mean()), "pooled_min": float(pc.min()),
            "patch_mean": float(tc.mean()), "patch_min": float(tc.min()),
            "special_min": min(sp) if sp else float("nan"), "special_mean": float(torch.tensor(sp).mean()) if sp else float("nan"),
            "knn_pooled": _pooled_knn(fp32[0], int8[0]),
            "knn_patch": _patch_knn(fp32[1][:, first_patch:], int8[1][:, first_patch:])}


def run_all(session, batches):
    import numpy as np
    import torch

    outs = [session.run(["pooled", "tokens"], {"pixel_values": x.numpy()}) for x in batches]
    return (torch.from_numpy(np.concatenate([o[0] for o in outs])), torch.from_numpy(np.concatenate([o[1] for o in outs])))


def activation_inputs(pre_path: Path, op_types=("MatMul", "Gemm")) -> list[str]:
    """The non-constant inputs of the nodes the static quantizer calibrates (before quantization)."""
    import onnx

    m = onnx.load(str(pre_path))
    inits = {i.name for i in m.graph.initializer}
    consts = {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    return sorted({t for n in m.graph.node if n.op_type in op_types for t in n.input
                   if t and t not in inits and t not in consts})


def row_ranges(pre_path: Path, tensors: list[str], batches, masks, num_tokens: int) -> dict:
    """{tensor: (rmin, rmax over all rows, rmin, rmax without the masked rows)}; masks[i]: bool [N] per
    image (True = leave out). The token axis is the first axis (from 1) of size num_tokens; tensors
    without one are skipped."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(pre_path))
    have = {o.name for o in m.graph.output}
    vi = {v.name: v for v in list(m.graph.value_info)}
    for t in tensors:
        if t not in have:
            m.graph.output.append(vi[t] if t in vi else onnx.helper.make_empty_tensor_value_info(t))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    stats: dict = {}
    img = 0
    for x in batches:
        outs = dict(zip(tensors, sess.run(tensors, {"pixel_values": x.numpy()})))
        for t, v in outs.items():
            axis = next((a for a in range(1, v.ndim) if v.shape[a] == num_tokens), None)
            if axis is None:
                continue
            mask = np.stack([masks[img + i] for i in range(len(v))])  # [b, N]
            shape = [len(v)] + [1] * (v.ndim - 1)
            shape[axis] = num_tokens
            keep = ~mask.reshape(shape)
            keep = np.broadcast_to(keep, v.shape)
            lo, hi = float(v.min()), float(v.max())
            klo, khi = float(v[keep].min()), float(v[keep].max())
            s = stats.get(t, (np.inf, -np.inf, np.inf, -np.inf))
            stats[t] = (min(s[0], lo), max(s[1], hi), min(s[2], klo), max(s[3], khi))
        img += len(x)
    return stats


def dominated(stats: dict, factor: float = 2.0) -> dict:
    """Tensors whose range with the masked rows is more than `factor` x the range without them."""
    out = {}
    for t, (lo, hi, klo, khi) in stats.items():
        full, kept = max(hi, 0) - min(lo, 0), max(khi, 0) - min(klo, 0)
        if kept > 0 and full / kept > factor:
            out[t] = full / kept
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=32, help="calibration images (224 px organism images)")
    ap.add_argument("--eval", type=int, default=32, help="evaluation images (another seed)")
    ap.add_argument("--outlier-norm", type=float, default=4.2,
                    help="planting strength (4.2: max/median patch norm ~30 at ViT-B, like the demo organism)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--write", action="store_true", help="replace the 'INT8 (onnxruntime)' section of RESULTS.md")
    ap.add_argument("--no-pin-malloc", action="store_true")
    a = ap.parse_args()
    pinned = bl.pin_malloc(not a.no_pin_malloc)

    import onnx
    import timm
    import timm.data
    import torch
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from surgery.exporters.onnx_int8 import quantize_file, register_branch_nodes
    from surgery import Recipe
    from surgery.backends import adapter_for
    from surgery.core.bake import baked_copy, register_token_indices
    from surgery.core.images import ImageBatches, list_images
    from surgery.organisms.vit import plant_register_neurons

    t0 = time.perf_counter()
    load_at_start = bl.load_average()
    bl.set_threads(a.threads)
    torch.manual_seed(0)
    original = timm.create_model(bl.ARCH, pretrained=False, pretrained_cfg_overlay=dict(crop_pct=1.0)).eval()
    planting = plant_register_neurons(original, bl.PLANT, seed=0, cls_token=original.cls_token,
                                      pos_embed=original.pos_embed, pos_includes_cls=not original.no_embed_class,
                                      outlier_norm=a.outlier_norm)
    fam = adapter_for(original)
    recipe = Recipe({int(k): list(v) for k, v in planting.neurons.items()})
    baked = baked_copy(original, recipe, adapter=fam)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=original))
    work = bl.work_dir("int8")
    try:
        def load(folder: Path, count: int, seed: int, bs: int = 8):
            bl.write_images(folder, count, seed=seed)
            return [x for x, _ in ImageBatches(list_images(folder), transform, bs, progress=False)]

        calib = load(work / "calib", a.calib, 101)
        evalb = load(work / "eval", a.eval, 202)
        # outlier strength and positions (original, last block) on the evaluation and calibration images
        def outliers(batches):
            ratios, masks = [], []
            with torch.no_grad():
                for x in batches:
                    h = original.norm_pre(original._pos_embed(original.patch_embed(x)))
                    for b in original.blocks:
                        h = b(h)
                    n = h[:, 1:].norm(dim=-1)
                    med = n.median(dim=1, keepdim=True).values
                    ratios += (n.max(dim=1).values / med[:, 0]).tolist()
                    masks += [torch.cat([torch.zeros(1, dtype=torch.bool), r]) for r in (n > 2.5 * med)]
            return ratios, masks

        eval_ratio, eval_masks = outliers(evalb)
        calib_ratio, calib_masks = outliers(calib)
        with_outliers = [r for r in eval_ratio if r > 2.5]
        print(f"max/median patch norm (eval, images with outliers: {len(with_outliers)}/{len(eval_ratio)}): "
              f"median {bl.median(with_outliers) if with_outliers else 0:.1f}", file=sys.stderr)

        paths, branch = {}, {}
        for name, model in (("original", original), ("baked", baked)):
            d = work / name
            d.mkdir()
            paths[name], _ = bl.export_onnx_file(model, fam, d)
            branch[name] = [n for v in register_branch_nodes(onnx.load(str(paths[name]))).values() for n in v]
        print(f"exported; {len(branch['baked'])} register-branch nodes in the baked graph", file=sys.stderr)
        regs = register_token_indices(baked, adapter=fam)
        first_patch = {"original": fam.num_prefix_tokens(original), "baked": fam.num_prefix_tokens(baked)}

        # range analysis (static calibration ranges) on the pre-processed float graphs
        pre = {}
        for name in paths:
            pre[name] = paths[name].with_name("pre.onnx")
            quant_pre_process(str(paths[name]), str(pre[name]))
        reg_masks = [torch.zeros(198, dtype=torch.bool).index_fill_(0, torch.tensor(regs), True).numpy()
                     for _ in range(a.calib)]
        stats_b = row_ranges(pre["baked"], activation_inputs(pre["baked"]), calib, reg_masks, 198)
        stats_o = row_ranges(pre["original"], activation_inputs(pre["original"]), calib,
                             [m.numpy() for m in calib_masks], 197)
        dom_b, dom_o = dominated(stats_b), dominated(stats_o)
        print(f"ranges dominated (> 2x): baked by the register row {len(dom_b)}/{len(stats_b)}, original by "
              f"high-norm patches {len(dom_o)}/{len(stats_o)}", file=sys.stderr)
        import numpy as np

        # ORT wants numpy scalars of the tensor's dtype for rmin/rmax
        overrides = {t: [{"rmin": np.array(min(s[2], 0.0), dtype=np.float32),
                          "rmax": np.array(max(s[3], 0.0), dtype=np.float32)}] for t, s in stats_b.items() if t in dom_b}

        # (model, mode, per-channel weights, label, quantize_file options, nodes kept float)
        variants = [("original", "static", True, "original", {}, []),
                    ("baked", "static", True, "baked, register branch float", {}, branch["baked"]),
                    ("baked", "static", True, "baked, register branch float, its input quantized",
                     {"float_input": False}, branch["baked"]),
                    ("original", "static", False, "original", {}, []),
                    ("baked", "static", False, "baked, register branch float", {}, branch["baked"]),
                    ("original", "dynamic", True, "original", {}, []),
                    ("baked", "dynamic", True, "baked, register branch float", {}, branch["baked"]),
                    ("original", "dynamic", False, "original", {}, []),
                    ("baked", "dynamic", False, "baked, register branch float", {}, branch["baked"])]
        if overrides:
            variants.insert(3, ("baked", "static", True, "baked, register branch float, register row out of the ranges",
                                {"overrides": overrides}, branch["baked"]))
        sessions = {name: bl.ort_session(paths[name], a.threads) for name in paths}
        ref = {name: run_all(sessions[name], evalb) for name in paths}
        rows = []
        for model_name, mode, per_channel, label, opts, exclude in variants:
            granularity = "per-channel" if per_channel else "per-tensor"
            q = work / model_name / f"{mode}-{len(rows)}.onnx"
            t = time.perf_counter()
            quantize_file(paths[model_name], q, mode, calibration=calib if mode == "static" else (),
                          exclude=exclude, per_channel=per_channel, work=work / model_name,
                          float_branch_input=opts.get("float_input", True),
                          range_overrides=opts.get("overrides"))
            took = time.perf_counter() - t
            s = bl.ort_session(q, a.threads)
            got = run_all(s, evalb)
            special = [regs] * len(eval_masks) if model_name == "baked" else \
                [m.nonzero().flatten().tolist() for m in eval_masks]
            f = fidelity(ref[model_name], got, first_patch[model_name], special)
            rows.append({"model": model_name, "mode": mode, "weights": granularity, "label": label, "path": q,
                         "session": s, "quantize_s": took, **f})
            print(f"{label} {mode} {granularity}: " + ", ".join(f"{k} {v:.4f}" for k, v in f.items()), file=sys.stderr)

        # latency: the adopted variant (first row) of each model, mode and weight granularity against float32
        lat = []
        gen = torch.Generator().manual_seed(0)
        adopted = {}
        for r in rows:
            adopted.setdefault((r["model"], r["mode"], r["weights"]), r)
        for bs in a.batches:
            xn = torch.randn(bs, 3, 224, 224, generator=gen).numpy()
            arms = {f"{n} fp32": bl.ort_arm(sessions[n], xn) for n in paths}
            arms.update({" ".join(key): bl.ort_arm(r["session"], xn) for key, r in adopted.items()})
            times, med = bl.time_arms(arms, a.warmup, a.rounds)
            row = {"batch": bs, "median": med}
            for key in adopted:
                row[key] = bl.paired_ratio(times[" ".join(key)], times[f"{key[0]} fp32"])
            row["baked/original fp32"] = bl.paired_ratio(times["baked fp32"], times["original fp32"])
            for mode, granularity in {(k[1], k[2]) for k in adopted}:
                tag = f"{mode} {granularity}"
                row[f"baked/original {tag}"] = bl.paired_ratio(times[f"baked {tag}"], times[f"original {tag}"])
            lat.append(row)
            print(f"batch {bs}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in med.items()), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t0

    lines = ["| model | mode | weights | pooled cosine mean (min) | patch-token cosine mean (min image) | special "
             "tokens cosine min (mean) | k-NN agreement, pooled | k-NN agreement, patch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['mode']} | {r['weights']} | {r['pooled_mean']:.4f} ({r['pooled_min']:.4f}) | "
                     f"{r['patch_mean']:.4f} ({r['patch_min']:.4f}) | {r['special_min']:.4f} ({r['special_mean']:.4f}) "
                     f"| {r['knn_pooled']:.3f} | {r['knn_patch']:.3f} |")
    combos = sorted({(k[1], k[2]) for r in lat for k in r if isinstance(k, tuple)}, key=lambda c: (c[0] != "static", c[1]))
    lat_lines = ["| batch | original fp32 | baked fp32 | baked/original fp32 | INT8 (mode, weights) | original INT8 | "
                 "baked INT8 | INT8/fp32 original | INT8/fp32 baked | baked/original INT8 |",
                 "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in lat:
        m = r["median"]
        for mode, granularity in combos:
            tag = f"{mode} {granularity}"
            lat_lines.append(f"| {r['batch']} | {m['original fp32'] * 1000:.0f} ms | {m['baked fp32'] * 1000:.0f} ms | "
                             f"{r['baked/original fp32']:.3f} | {mode}, {granularity} | "
                             f"{m['original ' + tag] * 1000:.0f} ms | {m['baked ' + tag] * 1000:.0f} ms | "
                             f"{r[('original', mode, granularity)]:.3f} | {r[('baked', mode, granularity)]:.3f} | "
                             f"{r['baked/original ' + tag]:.3f} |")
    dom_txt = (f"baked: the register row takes more than half of {len(dom_b)} of the {len(stats_b)} calibrated "
               f"activation ranges (worst {max(dom_b.values(), default=1):.1f}x); original: the high-norm patch "
               f"rows take more than half of {len(dom_o)} of {len(stats_o)} (worst {max(dom_o.values(), default=1):.1f}x)")
    body = (f"ViT-B/16 (`{bl.ARCH}`, random weights) with planted register neurons {recipe.neurons} "
            f"(outlier_norm {a.outlier_norm}: max/median patch-token norm at the last block, median over the "
            f"{len(with_outliers)} of {len(eval_ratio)} evaluation images with outliers: "
            f"{bl.median(with_outliers) if with_outliers else 0:.1f}; the demo organism's: 32.6), and the same "
            "model baked (those neurons, R = 1). Quantizer settings of `vit-surgery export --int8` "
            "(exporters/onnx_int8.py): static = quant_pre_process, quantize_static QDQ, symmetric int8 "
            "weights, int8 activations, one MinMax range per tensor, MatMul/Gemm/Conv; dynamic = "
            "quantize_dynamic, int8 weights (MatMul/Gemm); weights per channel (the exporter's setting) or "
            "per tensor. The baked model's register branch is "
            f"kept float by name ({len(branch['baked'])} nodes). Calibration: {a.calib} 224-px organism images "
            f"(seed 101); evaluation: {a.eval} others (seed 202). Fidelity is INT8 against the float32 graph "
            "of the same model (onnxruntime CPU, optimisation ALL). Special tokens: the register (baked), the "
            f"high-norm patch tokens (original). k-NN agreement: mean overlap of the {KNN_K} nearest "
            "neighbours by cosine (pooled: images; patch: the patch tokens of each image).\n\n"
            + "\n".join(lines) + "\n\n"
            f"Range analysis (static calibration, activation inputs of MatMul/Gemm): {dom_txt}.\n\n"
            f"Latency, onnxruntime CPU, {a.threads} thread, process CPU time, {a.warmup} warm-up calls and "
            f"{a.rounds} interleaved rounds, medians and medians of per-round ratios ({bl.malloc_note(pinned)}):\n\n"
            + "\n".join(lat_lines) + "\n\n"
            f"- Whole run: {total:.0f} s; load average at the start: {load_at_start}.\n" + bl.context_lines())
    print(body)
    if a.write:
        bl.write_section("INT8 (onnxruntime)", body)
        print(f"wrote section 'INT8 (onnxruntime)' of {bl.RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
