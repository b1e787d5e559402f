"""The judge's margin on real-size ViTs: the worst correct bake against the smallest caught mutation.

For each shape (ViT-B/16 and ViT-L/14 CLIP, random init, register neurons planted in blocks 5 and 6,
surgery/organisms/mutations.py) and seed: bake the planted recipe, judge it with `check_parity` on
organism images at 224 px, then judge each mutation (branch x1.05, wrong unit, register position,
prefix count) the same way. Each verdict's score is the largest error / allowed over all vectors
(> 1 fails). The margin is (smallest mutation score) / (largest correct score): how many times the
judge could loosen before a wrong bake passed, or tighten before a right one failed.

The correct bake is judged with the plain tolerance taken out (1e-12): its score is its error over the
kernel term alone (4 x the hooked reference's own float32 error, judge.kernel_allowance), and since every
allowance grows with the tolerance, its pass there is a pass at the default 1e-5 too. The mutations are
judged at the default tolerance.

    python benchmarks/bench_judge.py [--runs vit_b16:0:4,vit_l14:0:2] [--images 8] [--write]
"""
from __future__ import annotations

import argparse
import copy
import time

import benchlib  # noqa: F401  (puts the repo root on sys.path)

import torch


def _score(report) -> float:  # type: ignore[no-untyped-def]
    return max(e.excess(report.tolerance) for e in report.outputs.values())


def run_shape(shape: str, seed: int, images: int, batch: int) -> dict[str, object]:
    from surgery.backends import adapter_for
    from surgery.core.bake import bake_registers
    from surgery.core.errors import ParityError
    from surgery.core.parity import check_parity
    from surgery.organisms.mutations import MUTATIONS, build_real_size_vit

    model, recipe = build_real_size_vit(shape, seed)
    fam = adapter_for(model)

    def bake(m, r):  # type: ignore[no-untyped-def]
        return bake_registers(copy.deepcopy(m), r, adapter=adapter_for(m))

    folder = benchlib.work_dir("judge")
    from surgery.organisms.vit import write_organism_images

    patch = int(fam.patch_embed(model).kernel_size[0])  # triggers on the model's own patch grid
    files = write_organism_images(folder, count=images, seed=seed, size=224, patch=patch)
    tf = fam.data_transform(model)
    from PIL import Image

    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    batches = [x[i:i + batch] for i in range(0, len(x), batch)]
    baked = bake(model, recipe)
    t = time.perf_counter()
    # one run with the plain tolerance taken out: the allowances only grow with the tolerance, so a pass
    # here is a pass at the default 1e-5 too, and the score is the error over the kernel term alone
    report = check_parity(model, baked, recipe, batches, adapter=fam, tolerance=1e-12)
    seconds = time.perf_counter() - t
    row: dict[str, object] = {"shape": shape, "seed": seed, "images": len(x), "correct": _score(report),
                              "correct_passed": report.passed, "own": report.reference_own_error,
                              "seconds": seconds, "summary": report.summary()}
    mutations = {}
    for name, mutate in MUTATIONS.items():
        wrong = mutate(model, baked, recipe, bake)
        try:
            r = check_parity(model, wrong, recipe, batches, adapter=fam)
            mutations[name] = (_score(r), r.passed)
        except ParityError as e:  # refused before any number: caught with no margin to speak of
            mutations[name] = (float("inf"), False)
            print(f"  {name}: refused: {e}")
        del wrong
    row["mutations"] = mutations
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="vit_b16:0:4,vit_l14:0:2", help="SHAPE:SEED[:IMAGES],...")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    rows = []
    for run in a.runs.split(","):
        shape, seed, *count = run.split(":")
        row = run_shape(shape, int(seed), int(count[0]) if count else a.images, a.batch)
        rows.append(row)
        muts = ", ".join(f"{k} {v[0]:.3g}{'' if not v[1] else ' PASSED'}" for k, v in row["mutations"].items())
        print(f"{shape} seed {seed}: correct {row['correct']:.3g} ({'pass' if row['correct_passed'] else 'FAIL'}, "
              f"own float32 error {row['own']}, {row['seconds']:.0f} s); "
              f"mutations: {muts}", flush=True)
        print(f"  {row['summary']}", flush=True)
    worst_correct = max(r["correct"] for r in rows)
    smallest = min((v[0], k, r["shape"]) for r in rows for k, v in r["mutations"].items())
    all_ok = all(r["correct_passed"] for r in rows) and all(not v[1] for r in rows for v in r["mutations"].values())
    print(f"worst correct score {worst_correct:.3g}, smallest mutation score {smallest[0]:.3g} ({smallest[1]}, "
          f"{smallest[2]}): margin {smallest[0] / worst_correct:.3g}x; every verdict right: {all_ok}")
    if a.write:
        lines = ["| shape | seed | images | correct bake: max error / kernel allowance (tolerance 1e-12) "
                 "| hooked reference's own float32 error | " + " | ".join(rows[0]["mutations"]) + " |",
                 "|---|---|---|---|---|" + "---|" * len(rows[0]["mutations"])]
        for r in rows:
            lines.append(f"| {r['shape']} | {r['seed']} | {r['images']} | {r['correct']:.3g} "
                         f"({'PASS' if r['correct_passed'] else 'FAIL'}) | {r['own'] if r['own'] is None else format(r['own'], '.3g')} | "
                         + " | ".join(f"{v[0]:.3g} ({'PASS' if v[1] else 'FAIL'})" for v in r["mutations"].values())
                         + " |")
        body = (benchlib.context_lines() + "\n\nScore = largest (error / allowed) over every vector of every judged "
                "output (> 1 fails), `check_parity` against the float64 hooked reference.\n\n" + "\n".join(lines)
                + f"\n\nWorst correct bake {worst_correct:.3g}; smallest caught mutation {smallest[0]:.3g} "
                f"({smallest[1]}, {smallest[2]}): **margin {smallest[0] / worst_correct:.3g}x**. "
                f"Every verdict right: {all_ok}.\n")
        benchlib.write_section("Judge margin (real-size ViTs)", body)


if __name__ == "__main__":
    main()
