"""Shared helpers for the benchmarks (PyTorch ones, and the runtime harness of bench_onnx and bench_openvino).

Benchmarks are scripts, not tests: they print their numbers and, with --write, replace their own
section of benchmarks/RESULTS.md (other sections, e.g. the ONNX exporter's, are left untouched).
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ARCH = "vit_base_patch16_clip_224"  # OpenCLIP ViT-B/16 shape: 12 blocks, width 768, MLP 3072, 197 tokens
# ~10 register neurons in blocks <= 5, spread like the published OpenCLIP B/16 set (several blocks split).
BENCH_RECIPE = {2: [17, 101, 500], 3: [42, 1000, 2000], 4: [7, 300], 5: [1234, 3000]}
# Neurons planted into the random ViT-B for the discovery benchmarks (dark-patch triggers in block 1 fire
# reliably at this width, so the planted units produce real high-norm outliers at the last block).
PLANT = {1: [(17, -1), (101, -1), (500, -1), (900, -1), (1300, -1)]}


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def build_vitb(seed: int = 0, plant: bool = False):
    """Random-weight ViT-B/16 (CLIP layout) in eval mode; optionally with planted register neurons.

    crop_pct=1.0 makes the eval transform resize 224-px images to themselves, so planted triggers on
    16-px patch-aligned squares stay patch-aligned (the default 0.9 crop would blur them).
    """
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(ARCH, pretrained=False, pretrained_cfg_overlay=dict(crop_pct=1.0)).eval()
    if plant:
        from surgery.organisms.vit import plant_register_neurons

        plant_register_neurons(model, PLANT, seed=seed, cls_token=model.cls_token, pos_embed=model.pos_embed,
                               pos_includes_cls=not model.no_embed_class)
    return model


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` 224-px organism calibration PNGs (smooth texture plus 16-px dark/bright squares)."""
    from surgery.organisms.vit import write_organism_images

    return write_organism_images(folder, count=count, seed=seed, size=224, patch=16)


def work_dir(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"vitsurgery-bench-{name}-"))


def machine() -> str:
    model_name = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            model_name = m.group(1).strip()
    except OSError:
        pass
    import torch

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{model_name}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}"
            + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))


def load_average() -> str:
    try:
        a = os.getloadavg()
        return f"{a[0]:.2f} / {a[1]:.2f} / {a[2]:.2f}"
    except OSError:
        return "n/a"


def today() -> str:
    return _dt.datetime.now().strftime("%Y-%m-%d %H:%M")


def command_line() -> str:
    rel = os.path.relpath(sys.argv[0], ROOT)
    return " ".join([".venv/bin/python", rel, *sys.argv[1:]])


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleave(arms: dict[str, Callable[[], object]], rounds: int, sync: Callable[[], None] = lambda: None
               ) -> dict[str, dict[str, list[float]]]:
    """Time each arm once per round; the order alternates (A B C, C B A, ...) so drift cancels.

    Returns {"wall": {arm: [s, ...]}, "cpu": {arm: [s, ...]}}: wall-clock seconds and process CPU seconds
    (all threads). With one torch thread the CPU time is the work done, whatever else runs on the machine.
    """
    names = list(arms)
    out: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            sync()
            t, c = time.perf_counter(), time.process_time()
            arms[n]()
            sync()
            out["wall"][n].append(time.perf_counter() - t)
            out["cpu"][n].append(time.process_time() - c)
    return out


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i] (each round's arms ran side by side)."""
    return median([a / b for a, b in zip(num, den)])


def met(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def write_section(title: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the `## title` section of RESULTS.md, leaving every other section alone."""
    header = ("# Benchmark results\n\nNumbers are ratios measured side by side in one run on a shared, noisy "
              "machine; see benchmarks/README.md for the commands. Each section names its machine, command "
              "and date.\n")
    text = path.read_text(encoding="utf-8") if path.exists() else header
    block = f"## {title}\n\n{body.strip()}\n"
    pat = re.compile(rf"^## {re.escape(title)}[ \t]*\n.*?(?=^## |\Z)", re.M | re.S)
    if pat.search(text):
        text = pat.sub(lambda _m: block + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    text = text.rstrip("\n") + "\n"
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def context_lines(extra: str = "") -> str:
    cores = os.cpu_count() or 0
    shared = "; other jobs shared the 2 cores" if cores <= 2 else ""
    return (f"- Machine: {machine()}\n- Command: `{command_line()}`\n- Date: {today()} "
            f"(load average at the end: {load_average()}{shared}){extra}\n")


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident set size since the last reset_peak_rss() (VmHWM), else since the process started."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# glibc malloc hands large freed blocks (a batch-8 ViT-B activation is ~19 MB) back to the OS and
# page-faults them in again on the next call; how often differs between arms and runs and adds about
# +-1 % to CPU times. Timing scripts pin the thresholds (re-exec'ing themselves once) so steady-state
# calls take no page faults. Memory measurements run in child processes with the default malloc.
MALLOC_PINS = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30)}


def pin_malloc(enabled: bool = True) -> bool:
    """Re-exec this script once with MALLOC_PINS in the environment (returns whether they are set)."""
    if not enabled:
        return all(os.environ.get(k) == v for k, v in MALLOC_PINS.items())
    if all(os.environ.get(k) == v for k, v in MALLOC_PINS.items()):
        return True
    os.environ.update(MALLOC_PINS)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable] + sys.argv)
    return True  # not reached


def default_malloc_env() -> dict[str, str]:
    """This environment without MALLOC_PINS (for memory-measuring child processes)."""
    return {k: v for k, v in os.environ.items() if k not in MALLOC_PINS}


def malloc_note(pinned: bool) -> str:
    return ("glibc malloc thresholds pinned for timing (`MALLOC_MMAP_THRESHOLD_=32 MiB`, "
            "`MALLOC_TRIM_THRESHOLD_=16 GiB`: no page faults in steady state; `--no-pin-malloc` to disable)"
            if pinned else "default glibc malloc settings")


# ---- runtime benchmarks (bench_onnx, bench_openvino): one graph per model, arms timed side by side ----

def export_onnx_file(model, family, scratch: Path, exporter: str = "dynamo") -> tuple[Path, str]:
    """`model` exported the way `vit-surgery export` does (surgery.exporters.onnx_export.export_graph) and saved
    as scratch/model.onnx; returns the path and the exporter that produced the graph."""
    import onnx

    from surgery.exporters.onnx_export import export_graph

    g = export_graph(model, family, scratch, exporter=exporter, progress=False)
    path = scratch / "model.onnx"
    onnx.save_model(g.proto, str(path))
    return path, g.exporter


def ort_session(path: Path, threads: int):
    """onnxruntime on the CPU provider, optimisation ALL, `threads` intra-op threads, one inter-op."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def torch_arm(family, model, x) -> Callable[[], object]:
    """PyTorch eager (inference_mode): (pooled, tokens) of `model` on `x`."""
    import torch

    def run():
        with torch.inference_mode():
            return family.forward_both(model, x)
    return run


def ort_arm(session, xn) -> Callable[[], object]:
    """onnxruntime: [pooled, tokens] of the exported graph on the numpy batch `xn`."""
    return lambda: session.run(["pooled", "tokens"], {"pixel_values": xn})


def worst_relative_error(want: Sequence[object], got: Sequence[object]) -> float:
    """Worst per-vector relative error over (pooled, tokens) of a runtime's answer against PyTorch's."""
    import numpy as np
    import torch

    from surgery.core.parity import OutputError

    worst = 0.0
    for o, w, g in zip(("pooled", "tokens"), want, got):
        e = OutputError(o)
        e.update(torch.from_numpy(np.asarray(g)), w)
        worst = max(worst, e.relative)
    return worst


def time_arms(arms: dict[str, Callable[[], object]], warmup: int, rounds: int
              ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """`warmup` calls of every arm, then `rounds` interleaved rounds (interleave); returns the process
    CPU seconds per arm and their medians (one thread per runtime: CPU time is the work done)."""
    for _ in range(warmup):
        for f in arms.values():
            f()
    times = interleave(arms, rounds)["cpu"]
    return times, {k: median(v) for k, v in times.items()}
