"""Memory and time of `vit-surgery convert` (discovery excluded) on real-size random-weight models.

Rows (random weights, each built with its library's own constructor and written in its own layout):
  vitb16      timm ViT-B/16 (CLIP layout), timm local-dir (save_for_hf), 224 px
  dinov2_l14  DINOv2 ViT-L/14, torch-hub .pth, 518 px, the published dinov2_vitl14 neurons
  dinov2_g14  DINOv2 ViT-g/14 (SwiGLU), torch-hub .pth, 518 px
  bigG        OpenCLIP ViT-bigG-14, the full CLIP (text tower included), open_clip folder layout, 224 px

For each row and each code tree (--code NAME=PATH, e.g. before=a worktree of main, after=this one),
convert runs in a child process (PYTHONPATH=PATH); its peak RSS comes from wait4's rusage. Reported:
checkpoint bytes, the import footprint (a child importing the same modules and nothing else), peak
RSS, (peak - import) / checkpoint bytes (the target is <= 2.0 + one batch of activations), wall time,
and wall time in units of one float32 forward pass of the source model over the images the check used.

  .venv/bin/python benchmarks/bench_convert.py --rows vitb16,dinov2_l14 --code after=. --code before=../main-fcea494
  .venv/bin/python benchmarks/bench_convert.py --rows dinov2_g14 --code after=.   # one giant at a time

Giants need free memory: the script checks MemAvailable first and skips a row that would not fit.
Fixtures are cached under --work (default /tmp/vitsurgery-bench-convert).
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

from benchmarks.benchlib import BENCH_RECIPE, command_line, machine, today  # noqa: E402

GiB = 2 ** 30
# dims: (blocks, width, tokens with one test-time register, heads, MLP ratio) for the activation estimate
ROWS = {
    "vitb16": {"desc": "timm ViT-B/16 (CLIP), local-dir, 224 px", "weights_gb": 0.35, "dims": (12, 768, 198, 12, 4.0)},
    "dinov2_l14": {"desc": "DINOv2 ViT-L/14, torch-hub .pth, 518 px, published neurons", "weights_gb": 1.22,
                   "dims": (24, 1024, 1371, 16, 4.0)},
    "dinov2_g14": {"desc": "DINOv2 ViT-g/14 (SwiGLU), torch-hub .pth, 518 px", "weights_gb": 4.5,
                   "dims": (40, 1536, 1371, 24, 4096 / 1536)},
    "bigG": {"desc": "OpenCLIP ViT-bigG-14, full CLIP, open_clip folder, 224 px", "weights_gb": 10.2,
             "dims": (48, 1664, 258, 16, 8192 / 1664)},
}
NEURONS = {"vitb16": {"register_neurons": {str(k): v for k, v in BENCH_RECIPE.items()}},
           "dinov2_g14": {"register_neurons": {"10": [7, 300], "20": [1234]}},
           "bigG": {"register_neurons": {"20": [17, 5000], "30": [42]}}}


# ---- fixtures (run in a child: python bench_convert.py --build ROW DIR) ------------------------------

def build(row: str, folder: Path) -> None:
    import torch

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    if row == "vitb16":
        import timm
        from timm.models._hub import save_for_hf

        save_for_hf(timm.create_model("vit_base_patch16_clip_224", pretrained=False).eval(), folder / "src")
    elif row in ("dinov2_l14", "dinov2_g14"):
        import timm

        from surgery.organisms.families import timm_to_dinov2_hub

        arch = "vit_large_patch14_dinov2" if row == "dinov2_l14" else "vit_giant_patch14_dinov2"
        model = timm.create_model(arch, pretrained=False, img_size=518).eval()
        sd = timm_to_dinov2_hub(model)
        del model
        name = "dinov2_vitl14_pretrain.pth" if row == "dinov2_l14" else "dinov2_vitg14_pretrain.pth"
        torch.save(sd, folder / name)
    elif row == "bigG":
        import open_clip

        from surgery.core.safetensors_io import save_state_dict

        from open_clip.push_to_hf_hub import save_config_for_hf

        cfg = open_clip.get_model_config("ViT-bigG-14")
        model = open_clip.create_model("ViT-bigG-14", pretrained=None).eval()  # sets the preprocess config
        src = folder / "src"
        src.mkdir(exist_ok=True)
        save_config_for_hf(model, src / "open_clip_config.json", model_config=cfg)  # open_clip's own writer
        save_state_dict(model.state_dict(), src / "open_clip_model.safetensors", None)  # tensor by tensor
    if row in NEURONS:
        (folder / "neurons.json").write_text(json.dumps(NEURONS[row]))


def spec_of(row: str, folder: Path) -> tuple[str, list[str]]:
    if row == "vitb16":
        return str(folder / "src"), ["--neurons", str(folder / "neurons.json")]
    if row == "dinov2_l14":
        return f"dinov2:{folder / 'dinov2_vitl14_pretrain.pth'}", []  # published dinov2_vitl14 picked by name
    if row == "dinov2_g14":
        return f"dinov2:{folder / 'dinov2_vitg14_pretrain.pth'}", ["--neurons", str(folder / "neurons.json")]
    return str(folder / "src"), ["--neurons", str(folder / "neurons.json")]


def checkpoint_bytes(row: str, folder: Path) -> int:
    files = [p for p in folder.rglob("*") if p.suffix in (".pth", ".bin", ".safetensors")
             and not any(part.startswith("out") for part in p.relative_to(folder).parts)]
    return sum(p.stat().st_size for p in files)


# ---- child processes ---------------------------------------------------------------------------

def run_measured(cmd: list[str], code: Path, timeout: float) -> tuple[int, float, int, str]:
    """Like run_child, but the peak RSS comes from a wrapper that waits for the command with wait4."""
    wrapper = ("import os,sys,subprocess,time,json;t=time.perf_counter();"
               "p=subprocess.Popen(sys.argv[1:]);_,s,ru=os.wait4(p.pid,0);"
               "print(json.dumps({'rc':os.waitstatus_to_exitcode(s),'wall':time.perf_counter()-t,"
               "'rss':ru.ru_maxrss*1024}),file=sys.stderr)")
    env = dict(os.environ, PYTHONPATH=str(code))
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=str(code), env=env, capture_output=True,
                       text=True, timeout=timeout)
    last = [ln for ln in p.stderr.splitlines() if ln.startswith("{\"rc\"")]
    if not last:
        return p.returncode or 1, 0.0, 0, (p.stdout + p.stderr)[-2000:]
    d = json.loads(last[-1])
    return d["rc"], d["wall"], d["rss"], (p.stdout + p.stderr)[-2000:]


IMPORTS = ("import torch, timm, open_clip, safetensors, PIL, surgery.pipeline, surgery.backends, "
           "surgery.core.parity, surgery.cli")

FORWARD = r'''
import sys, time, json, torch
from surgery.backends import load_model
from surgery.core.images import builtin_images
from surgery.core.images import ImageBatches, list_images
torch.set_num_threads(int(sys.argv[2]))
lm = load_model(sys.argv[1])
files = list_images(builtin_images(), 2, 0)
x = torch.cat([b for b, _ in ImageBatches(files, lm.transform, 2, progress=False)])
times = []
with torch.inference_mode():
    for i in range(2):
        t = time.perf_counter(); lm.adapter.forward_both(lm.model, x[i:i + 1]); times.append(time.perf_counter() - t)
print(json.dumps({"forward_s_per_image": min(times)}))
'''


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(row: str, code_name: str, code: Path, folder: Path, threads: int, timeout: float) -> dict:
    spec, extra = spec_of(row, folder)
    out = folder / f"out-{code_name}"
    py = sys.executable
    rc_i, _, import_rss, _ = run_measured([py, "-c", IMPORTS], code, 300)
    cmd = [py, "-m", "surgery.cli", "convert", spec, *extra, "--out", str(out), "--overwrite", "-q"]
    os.environ["OMP_NUM_THREADS"] = str(threads)
    rc, wall, rss, tail = run_measured(cmd, code, timeout)
    parity = {}
    if (out / "parity.json").is_file():
        parity = json.loads((out / "parity.json").read_text()).get("parity", {})
    ckpt = checkpoint_bytes(row, folder)
    return {"row": row, "code": code_name, "rc": rc, "wall_s": wall, "peak_rss": rss, "import_rss": import_rss,
            "checkpoint_bytes": ckpt, "ratio": (rss - import_rss) / ckpt if ckpt else None,
            "parity_images": parity.get("images"), "passed": parity.get("passed"), "tail": tail if rc else ""}


def forward_time(row: str, folder: Path, code: Path, threads: int) -> float:
    spec, _ = spec_of(row, folder)
    p = subprocess.run([sys.executable, "-c", FORWARD, spec, str(threads)], cwd=str(code), capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(code)), timeout=1800)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    return json.loads(line[-1])["forward_s_per_image"] if line else float("nan")


def activations(row: str, images: int, batch: int = 8) -> int:
    """One batch of activations as convert's estimate counts it (surgery/core/memory.py)."""
    import torch

    from surgery.core.memory import activation_bytes

    blocks, width, tokens, heads, ratio = ROWS[row]["dims"]
    return activation_bytes(blocks, width, tokens, min(batch, images or batch), heads, torch.float32, ratio)


def table(results: list[dict], forwards: dict[str, float]) -> str:
    lines = ["| model | code | checkpoint | import | convert peak RSS | (peak - import) / checkpoint | one batch of "
             "activations (estimate) | target: import + 2 x checkpoint + activations | wall | parity images | "
             "wall / (one fp32 forward x images) | parity |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        fw = forwards.get(r["row"], r.get("forward_s_per_image", float("nan")))
        n = r["parity_images"] or 0
        passes = r["wall_s"] / (fw * n) if n and fw == fw else float("nan")
        ok = {True: "PASS", False: "FAIL", None: f"exit {r['rc']}"}[r["passed"] if r["rc"] == 0 else None]
        act = activations(r["row"], n)
        target = r["import_rss"] + 2 * r["checkpoint_bytes"] + act
        met = "met" if r["peak_rss"] <= target else "missed"
        lines.append(f"| {ROWS[r['row']]['desc']} | {r['code']} | {r['checkpoint_bytes'] / 1e9:.2f} GB | "
                     f"{r['import_rss'] / GiB:.2f} GiB | {r['peak_rss'] / GiB:.2f} GiB | {r['ratio']:.2f}x | "
                     f"{act / GiB:.2f} GiB | {target / GiB:.2f} GiB ({met}) | {r['wall_s']:.0f} s | {n} | "
                     f"{passes:.1f} | {ok} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="vitb16,dinov2_l14")
    ap.add_argument("--code", action="append", default=[], help="NAME=PATH of a code tree (default after=.)")
    ap.add_argument("--work", default="/tmp/vitsurgery-bench-convert")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", default=None, help="append results as JSON lines to this file")
    ap.add_argument("--table", default=None, help="print the table of a --json file and exit")
    ap.add_argument("--build", nargs=2, metavar=("ROW", "DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.table:
        print(table([json.loads(ln) for ln in Path(a.table).read_text().splitlines() if ln.strip()], {}))
        return
    if a.build:
        build(a.build[0], Path(a.build[1]))
        return
    codes = [(c.split("=", 1)[0], Path(c.split("=", 1)[1]).resolve()) for c in (a.code or ["after=."])]
    results, forwards = [], {}
    for row in a.rows.split(","):
        folder = Path(a.work) / row
        if not (folder / "built").exists():
            need = 1.3 * ROWS[row]["weights_gb"] * 1e9  # the built model plus one tensor being written
            if mem_available() < need:
                print(f"{row}: skipped building, {mem_available() / GiB:.1f} GiB available", flush=True)
                continue
            t = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--build", row, str(folder)], check=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
            (folder / "built").write_text(f"{time.perf_counter() - t:.0f} s\n")
            print(f"{row}: built in {time.perf_counter() - t:.0f} s", flush=True)
        forwards[row] = forward_time(row, folder, codes[0][1], a.threads)
        print(f"{row}: one forward pass {forwards[row]:.2f} s/image", flush=True)
        for name, code in codes:
            r = measure(row, name, code, folder, a.threads, a.timeout)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "tail"}), flush=True)
            if r["tail"]:
                print(r["tail"], flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(dict(r, forward_s_per_image=forwards[row])) + "\n")
    print()
    print(f"machine: {machine()}; date {today()}; command: {command_line()}")
    print(table(results, forwards))


if __name__ == "__main__":
    main()
