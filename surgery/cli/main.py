"""`vit-surgery` command line. Every user error ends as one line on stderr and a documented exit code."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .. import __version__
from . import export as onnx_cli, report as report_cli
from .args import (format_names, int_or_auto, num_registers_arg, positive_float, positive_int, scale_arg, threshold_arg,
                   add_model_options, add_output_options, progress_of)
from .checks import validate_before_loading
from ..core.errors import EXIT_CODES, SurgeryError
from ..core.outputs import shown

MODEL_HELP = ("timm name, hf-hub:ORG/NAME, local-dir:PATH or a model folder, open_clip:ARCH/TAG, "
              "hf:ORG/NAME or hf:PATH, dinov2:FILE.pth, or an .onnx file (see docs/guides/models.md)")


def add_discovery_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("discovery")
    g.add_argument("--batch-size", type=positive_int, default=8)
    g.add_argument("--num-images", type=positive_int, default=None, help="seeded sample of this many images")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--detect-layer", type=int, default=None, help="block whose output norms flag outliers (default: last)")
    g.add_argument("--threshold", type=threshold_arg, default="auto",
                   help="outlier norm threshold, or 'auto' (default): norm > 2.5 x the image's median patch-token norm")
    g.add_argument("--max-layer", type=int_or_auto(0), default="auto",
                   help="score units in blocks <= this; 'auto' (default): the block where outliers reach 90%% of their peak")
    g.add_argument("--top-k", type=int_or_auto(1), default="auto",
                   help="keep K units; 'auto' (default): cut at the score gap")
    g.add_argument("--sparsity-filter", action="store_true",
                   help="keep a unit only on images where it is below 0.5 on at least half of the tokens")
    g.add_argument("--include-prefix", action="store_true", help="let CLS/prefix tokens count as outliers")


def add_recipe_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("intervention")
    g.add_argument("--num-registers", type=num_registers_arg, default=None, help="R test-time registers (1-64, default 1)")
    g.add_argument("--scale", type=scale_arg, default=None,
                   help="register rows get scale x signed max (default 1; |scale| <= 1e6)")
    g.add_argument("--mode", choices=["shared", "per_neuron"], default=None,
                   help="one signed max per block (shared, default) or per neuron")


def _discovery_config(a: argparse.Namespace):
    from ..core.discovery import DiscoveryConfig

    return DiscoveryConfig(detect_layer=a.detect_layer, threshold=a.threshold, max_layer=a.max_layer,
                           top_k=a.top_k, sparsity_filter=a.sparsity_filter, include_prefix=a.include_prefix,
                           batch_size=a.batch_size, num_images=a.num_images, seed=a.seed,
                           num_registers=a.num_registers or 1, scale=1.0 if a.scale is None else a.scale,
                           mode=a.mode or "shared")


def _options(a: argparse.Namespace):
    from ..core.source import LoadOptions

    return LoadOptions(a.allow_unsafe_pickle, a.trust_remote_code, a.device)


# ---- commands: parse, call surgery.api, print --------------------------------------------------

def cmd_find(a: argparse.Namespace) -> int:
    from .. import api

    result = api.find(a.model, a.images, out=a.out, overwrite=a.overwrite, discovery=_discovery_config(a),
                      options=_options(a), progress=progress_of(a))
    print(result.summary())
    print(f"wrote {a.out}")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from .. import api

    res = api.convert(a.model, a.out, neurons=a.neurons, images=a.images, to=a.to, onnx=a.onnx,
                      formats=a.formats or (), fp16=a.fp16, dtype=a.dtype, check=not a.no_check,
                      check_images=a.check_images, tolerance=a.tolerance, overwrite=a.overwrite,
                      discovery=_discovery_config(a), num_registers=a.num_registers, scale=a.scale, mode=a.mode,
                      options=_options(a), progress=progress_of(a))
    for line in res.summary_lines():
        print(line)
    return 0


def cmd_check(a: argparse.Namespace) -> int:
    """Verify OUT (hashes), then compare it with the hooked reference and re-validate every exported format
    present. Never writes into OUT: the report goes to --report only."""
    from .. import api
    from ..core.errors import ParityError
    from ..core.outputs import atomic_output_file

    res = api.check(a.out_dir, source=a.source, images=a.images, num_images=a.num_images, batch_size=a.batch_size,
                    seed=a.seed, tolerance=a.tolerance, skip_exports=a.skip_onnx, options=_options(a),
                    progress=progress_of(a))
    if a.report:
        from ..core.output_format import write_json

        with atomic_output_file(Path(a.report), True) as tmp:
            write_json(tmp, res.to_dict())
    for line in res.summary_lines():
        print(line)
    if a.report:
        print(f"wrote {a.report}")
    from ..pipeline import warn_remaining_outliers

    warn_remaining_outliers(res.effect)
    if not res.passed:
        raise ParityError(res.failure() + (f" (see {a.report})" if a.report and res.report.passed else ""))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(Path(a.out), overwrite=a.overwrite, quiet=a.quiet)


# ---- parser ------------------------------------------------------------------------------------

# Long on purpose: one flat, declarative list of every subcommand's arguments, read top to bottom like --help.
def build_parser() -> argparse.ArgumentParser:
    epilog = "exit codes: " + "; ".join(f"{k} {v.rstrip('.')}" for k, v in EXIT_CODES.items())
    p = argparse.ArgumentParser(prog="vit-surgery", description="Bake test-time registers into pretrained ViTs.",
                                epilog=epilog)
    p.add_argument("--version", action="version", version=f"vit-surgery {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for unexpected errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    f = sub.add_parser("find", help="find register neurons from calibration images")
    f.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    f.add_argument("--images", required=True, help="folder of calibration images (searched recursively)")
    f.add_argument("--out", required=True, help="neurons JSON file to write")
    f.add_argument("--overwrite", action="store_true")
    add_output_options(f)
    add_discovery_options(f)
    add_recipe_options(f)
    add_model_options(f)
    f.set_defaults(func=cmd_find)

    c = sub.add_parser("convert", help="bake test-time registers and write a standalone model folder")
    c.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    src = c.add_mutually_exclusive_group(required=False)
    src.add_argument("--neurons", help="neurons JSON file, or a published set name (e.g. dinov2_vitl14); "
                                       "default: the published set when the model is recognised")
    src.add_argument("--images", help="calibration images: find the neurons first")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--no-check", action="store_true", help="skip the parity check (not recommended)")
    c.add_argument("--check-images", default=None, help="images for the parity check (default: --images or built-in)")
    c.add_argument("--tolerance", type=positive_float, default=1e-5,
                   help="relative error allowed, a positive number (default 1e-5; each vector is also allowed what "
                        "float32 rounding does to it, measured in the same run: see README, the judge)")
    c.add_argument("--to", choices=["native", "timm"], default="native",
                   help="output library: the input's own (default), or timm (open_clip CLIP, HF CLIP and HF DINOv2 inputs too)")
    c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="dtype of the written weights (default: the source checkpoint's)")
    c.add_argument("--onnx", action="store_true", help="also write and validate OUT/model.onnx (= --formats onnx)")
    c.add_argument("--formats", type=format_names, default=[], metavar="NAME[,NAME]",
                   help="also write and validate these export formats before OUT is moved into place "
                        "(format registry: onnx, onnx_hf, openvino)")
    c.add_argument("--fp16", action="store_true", help="with --onnx / --formats onnx: export in float16 "
                                                       "(looser tolerance)")
    add_output_options(c)
    add_discovery_options(c)
    add_recipe_options(c)
    add_model_options(c)
    c.set_defaults(func=cmd_convert)

    k = sub.add_parser("check", help="verify a converted folder against the hooked reference")
    k.add_argument("out_dir", metavar="OUT", help="folder written by convert")
    k.add_argument("--images", default=None, help="images (default: the built-in calibration set)")
    k.add_argument("--source", default=None, help="compare against this original model instead of the un-baked weights")
    k.add_argument("--num-images", type=positive_int, default=16)
    k.add_argument("--batch-size", type=positive_int, default=8)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--tolerance", type=positive_float, default=None,
                   help="relative error allowed (default: the tolerance OUT was converted with, from its parity.json, "
                        "else 1e-5)")
    k.add_argument("--report", default=None,
                   help="also write the JSON report to this file (check never writes into OUT)")
    k.add_argument("--skip-exports", "--skip-onnx", dest="skip_onnx", action="store_true",
                   help="do not re-validate the exported formats present in OUT (model.onnx, onnx/, openvino_model.xml)")
    add_output_options(k)
    add_model_options(k)
    k.set_defaults(func=cmd_check)

    d = sub.add_parser("demo", help="the whole pipeline on the built-in organism (no network needed)")
    d.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    d.add_argument("--overwrite", action="store_true")
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return p


# Subcommands defined next to their jobs (export; inspect, eval): fn(subparsers) -> None.
_EXTRA_COMMANDS: tuple[Callable[[Any], None], ...] = (onnx_cli.add_commands, report_cli.add_commands)


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeouts, `docker stop`, Slurm) unwinds like Ctrl-C, so temporary outputs are removed."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


_CORE_COMMANDS = ("find", "convert", "check", "demo")  # the ones -q quiets (no summary lines)


def _os_error_exit(e: OSError) -> Optional[int]:
    """Exit code of an environment error that is not a bug: the disk or OUT's file system refused a write."""
    import errno

    return 10 if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.EFBIG) else None


# Libraries that log each network retry (an unreachable hub: five "Retrying in Ns" pairs per file, each
# printed by their handler and again by ours): their failure ends as one SurgeryError line instead.
NOISY_LOGGERS = ("huggingface_hub", "httpx", "httpcore", "urllib3", "filelock", "onnx_ir")


def quiet_library_loggers(verbose: bool = False) -> None:
    """Errors only from the libraries' own loggers (-v keeps their warnings). huggingface_hub sets its
    logger's level when it is imported, from HF_HUB_VERBOSITY: set for a later import, and here for an
    earlier one."""
    if not verbose:
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.ERROR)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command. User errors: one line on stderr and their exit code; Ctrl-C 130, SIGTERM 143, each
    one line, whenever they arrive; exit 1 only for bugs."""
    import contextlib
    import signal
    import threading

    args = list(sys.argv[1:] if argv is None else argv)
    handles_signals = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if handles_signals else None
    try:
        a = build_parser().parse_args(args)
        logging.basicConfig(level=logging.WARNING, format="vit-surgery: %(message)s")
        quiet_library_loggers(verbose=getattr(a, "verbose", False))
        warnings.showwarning = lambda msg, cat, *rest, **kw: print(f"vit-surgery: warning: {msg}", file=sys.stderr)
        # each run says its warnings once (touching the filters also forgets what an earlier run in this
        # process already said: the Python API and tests call main() many times)
        warnings.filterwarnings("default", category=UserWarning)
        with contextlib.ExitStack() as stack:
            if a.command in _CORE_COMMANDS and a.quiet:  # -q: no summary lines; warnings, errors on stderr
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            validate_before_loading(a)
            from ..core.progress import reporting  # every command's stages show as -q / -v say

            stack.enter_context(reporting(progress_of(a)))
            return int(a.func(a) or 0)
    except SurgeryError as e:
        print(f"vit-surgery: error: {e.cli_message()}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        code = _os_error_exit(e)
        if code is None or "--debug" in args:
            return _internal_error(e, args)
        print(f"vit-surgery: error: cannot write the output: {e.strerror or e} ({shown(e.filename or '')}); "
              "nothing was written", file=sys.stderr)
        return code
    except Terminated:
        print("vit-surgery: terminated (SIGTERM); no output was left behind", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("vit-surgery: interrupted; no output was left behind", file=sys.stderr)
        return 130
    except RecursionError as e:  # vit-surgery recurses only into what it reads: an input nested without bound
        if "--debug" in args:
            raise
        print("vit-surgery: error: an input (a JSON config, processor config or ONNX graph) is nested too deeply to "
              f"read ({str(e).splitlines()[0] if str(e) else 'recursion limit'}); nothing was written", file=sys.stderr)
        return 4
    except Exception as e:  # an unexpected failure: one line unless --debug
        return _internal_error(e, args)
    finally:
        if handles_signals:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _internal_error(e: BaseException, args: list[str]) -> int:
    if "--debug" in args:
        raise e
    print(f"vit-surgery: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
          "(rerun with --debug for a traceback)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
