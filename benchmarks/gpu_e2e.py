"""`--device cuda` end to end: find, convert (fp32 / fp16 / bf16), check and export, through the CLI.

  python benchmarks/gpu_e2e.py [--device cuda] [--work DIR] [--json FILE]

A planted random ViT-B/16 (benchlib.build_vitb, the neurons of benchlib.PLANT) is written with timm's own
`save_for_hf`; 32 organism images are written beside it. Each step runs `vit-surgery` in a child
process with `--device`, and the script records its exit code, wall time and the one-line result.
The find step (top-k 5) must recover exactly the planted units; every step must exit 0. Prints a Markdown table
for benchmarks/RESULTS.md and exits 1 if any step failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.benchlib import PLANT, build_vitb, machine, today, write_images  # noqa: E402

CLI = [sys.executable, "-c", "import sys; from surgery.cli import main; sys.exit(main())"]


def run_step(name: str, args: list[str], log: list[dict]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t = time.perf_counter()
    proc = subprocess.run(CLI + args, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t
    tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or [""])[-1]
    log.append({"step": name, "rc": proc.returncode, "wall_s": round(wall, 1), "last_line": tail[:200]})
    print(f"[{name}] rc={proc.returncode} {wall:.1f}s {tail[:200]}", flush=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", flush=True)
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", default="/tmp/vitsurgery-gpu-e2e")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dtypes", default="float32,float16,bfloat16", help="convert (and check) in these dtypes")
    ap.add_argument("--quick", action="store_true", help="find and convert only (no check, export or auto steps)")
    a = ap.parse_args()

    from timm.models import save_for_hf

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    save_for_hf(build_vitb(0, plant=True), work / "src", safe_serialization=True)
    write_images(work / "imgs", 32)
    dev = ["--device", a.device]
    log: list[dict] = []
    run_step("find", ["find", str(work / "src"), "--images", str(work / "imgs"), "--out", str(work / "n.json"),
                      "--top-k", "5", "--overwrite", "-q"] + dev, log)
    found = json.loads((work / "n.json").read_text())["register_neurons"] if (work / "n.json").exists() else {}
    planted = {str(b): sorted(u for u, _ in units) for b, units in PLANT.items()}
    found_ok = {b: sorted(v) for b, v in found.items()} == planted
    log.append({"step": "find recovers the planted units", "rc": 0 if found_ok else 1, "wall_s": 0,
                "last_line": f"found {found} planted {planted}"})
    for dtype in a.dtypes.split(","):
        out = work / f"out_{dtype}"
        run_step(f"convert {dtype}", ["convert", str(work / "src"), "--neurons", str(work / "n.json"),
                                      "--out", str(out), "--overwrite", "--dtype", dtype,
                                      "--check-images", str(work / "imgs"), "-q"] + dev, log)
        if a.quick:
            continue
        run_step(f"check {dtype}", ["check", str(out), "--images", str(work / "imgs"), "-q"] + dev, log)
        parity = out / "parity.json"
        if parity.is_file():  # the numbers behind the verdict, for RESULTS.md
            doc = json.loads(parity.read_text())
            print(f"[parity {dtype}]", json.dumps({k: v for k, v in doc.items() if not isinstance(v, (dict, list))}))
    if a.quick:
        return _finish(a, log)
    if "float32" in a.dtypes.split(","):
        run_step("export onnx (fp32)", ["export", str(work / "out_float32"), "--overwrite", "-q"] + dev, log)
    if "float16" in a.dtypes.split(","):  # exports the float16 folder converted above
        run_step("export onnx (fp16)", ["export", str(work / "out_float16"), "--overwrite", "--fp16", "-q"] + dev, log)
    run_step("auto device: find", ["find", str(work / "src"), "--images", str(work / "imgs"), "--out",
                                   str(work / "n_auto.json"), "--top-k", "5", "--overwrite", "-q", "--device", "auto"], log)
    return _finish(a, log)


def _finish(a: argparse.Namespace, log: list[dict]) -> int:
    """Print the Markdown table (and write --json); 0 when every step passed."""
    import torch

    print(f"\nmachine: {machine()}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA'}; "
          f"torch {torch.__version__}; date {today()}")
    print("| step | exit | wall (s) | result |\n|---|---|---|---|")
    for r in log:
        print(f"| {r['step']} | {r['rc']} | {r['wall_s']} | {r['last_line'].replace('|', '/')} |")
    if a.json:
        Path(a.json).write_text(json.dumps(log, indent=2) + "\n")
    return 0 if all(r["rc"] == 0 for r in log) else 1


if __name__ == "__main__":
    sys.exit(main())
