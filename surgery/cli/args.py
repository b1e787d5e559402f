"""Argument types and options shared by the `vit-surgery` subcommands (cli.py, onnx_cli.py, report_cli.py)."""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable


def _number(cast: Callable[[str], Any], what: str, ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An argparse type: `cast` the text and check it, else a usage error naming what was expected."""
    def parse(v: str) -> Any:
        try:
            x = cast(v)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"must be {what}, got {v!r}") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"must be {what}, got {v!r}")
        return x
    return parse


def _or_auto(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda v: v if v == "auto" else parse(v)


positive_int = _number(int, "a positive integer", lambda i: i >= 1)
_finite_float = _number(float, "a finite number", math.isfinite)
positive_float = _number(float, "a positive number", lambda f: f > 0 and math.isfinite(f))
fraction = _number(float, "a number between 0 and 1 (exclusive)", lambda f: 0 < f < 1)
num_registers_arg = _number(int, "an integer from 1 to 64", lambda i: 1 <= i <= 64)
scale_arg = _number(float, "a finite number with |scale| <= 1e6", lambda f: math.isfinite(f) and abs(f) <= 1e6)
threshold_arg = _or_auto(_number(float, "a positive number or 'auto'", lambda f: f > 0 and math.isfinite(f)))


def format_names(v: str) -> list[str]:
    """`--formats onnx,openvino`: names of the format registry (exporters/formats.py), checked here."""
    from surgery.exporters.formats import FORMATS

    names = [n.strip() for n in v.split(",") if n.strip()]
    known = [f.name for f in FORMATS]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown format {bad[0] if bad else v!r}; known: {', '.join(known)}")
    return names


def int_or_auto(minimum: int) -> Callable[[str], int | str]:
    return _or_auto(_number(int, f"an integer >= {minimum} or 'auto'", lambda i: i >= minimum))


def add_output_options(p: argparse.ArgumentParser) -> None:
    """-q / -v: how much progress the command shows on stderr (surgery/core/progress.py)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary lines (warnings and "
                                                              "errors only)")
    g.add_argument("-v", "--verbose", action="store_true", help="also each step's time and detail lines")


def progress_of(a: argparse.Namespace):  # type: ignore[no-untyped-def]
    """-q: nothing on stderr but warnings and errors; default: a bar per long step on a terminal, one
    line per step otherwise; -v: each step's time and detail lines too (surgery/core/progress.py)."""
    import os

    from ..core.progress import Progress

    # VIT_SURGERY_PROGRESS=bars|lines|off overrides the choice by terminal (as TQDM_DISABLE does for tqdm)
    chosen = {"off": "log", "bars": "bars", "lines": "lines"}.get(os.environ.get("VIT_SURGERY_PROGRESS", ""), "auto")
    return Progress("log" if getattr(a, "quiet", False) else chosen, verbose=getattr(a, "verbose", False))


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu); the reference runs "
                   "in exact float32/float64 there, no autocast")
    p.add_argument("--allow-unsafe-pickle", action="store_true",
                   help="allow checkpoints that need full unpickling (runs code from the file; only for trusted files)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow HF models whose code lives in the model folder (never on by default)")
