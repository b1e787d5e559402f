"""`vit-surgery convert|check` when MODEL / OUT is a folder of ONNX files (an HF ONNX repo): see folder.py.

The single-file commands' helpers (recipe from --neurons / --images, check images, messages) are passed in
by onnx_graph/cli.py, which dispatches here (no import back: one import direction)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

from ..core.errors import ModelInputError, ParityError


def cmd_convert_folder(a: argparse.Namespace, config: Any, recipe_for: Callable[..., Any],
                       check_batches: Callable[..., Any], say: Callable[[argparse.Namespace, str], None]) -> int:
    from ..core.integrity import record_onnx_output
    from ..core.outputs import atomic_output_dir, check_output_target
    from .folder import convert_folder, require_onnx_folder

    if getattr(a, "to", "native") != "native" or getattr(a, "onnx", False) or getattr(a, "fp16", False):
        raise ModelInputError("--to, --onnx and --fp16 apply to PyTorch models; an ONNX folder is written with the "
                              "same files, each rewritten")
    check_output_target(a.out, a.overwrite)
    source = require_onnx_folder(a.model)
    base = source.find_source() if not a.neurons else None
    recipe, doc = recipe_for(a, config, model=str(base) if base else None)
    pixels_from = base or source.files[0]
    batches = None if a.no_check else check_batches(pixels_from, a.check_images or a.images, 16, 0, not a.quiet)
    say(a, f"rewriting {len(source.files)} ONNX file(s) of {source.root}: {recipe.num_neurons} register neuron(s), "
            f"R={recipe.num_registers}")
    with atomic_output_dir(a.out, a.overwrite) as tmp:
        summaries, check = convert_folder(source, tmp, recipe, check_batches=batches, tolerance=a.tolerance,
                                          say=lambda m: say(a, m))
        (tmp / "neurons.json").write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
        if check is not None:
            (tmp / "parity.json").write_text(json.dumps({"onnx_folder": check.to_dict()}, indent=2, default=float)
                                             + "\n")
        record_onnx_output(tmp, recipe.to_dict(), str(a.model))
    units = ", ".join(f"{k}: {list(v)}" for k, v in recipe.neurons.items())
    print(f"baked {recipe.num_neurons} register neuron(s) ({units}), R={recipe.num_registers} into "
          + ", ".join(f"{k} ({s['precision']})" for k, s in summaries.items()))
    if check is not None:
        print(check.summary())
    print(f"wrote {a.out}")
    return 0


def cmd_check_folder(a: argparse.Namespace, check_batches: Callable[..., Any]) -> int:
    """Check every rewritten variant of an ONNX folder. Never writes into OUT: the report goes to --report only."""
    import json

    from ..core.errors import UsageError
    from ..core.integrity import verify_onnx_output
    from ..core.outputs import atomic_output_file
    from .folder import check_folder, require_onnx_folder

    out = require_onnx_folder(a.out_dir)
    if not a.source:
        raise UsageError("checking an ONNX folder needs --source ORIGINAL_FOLDER (the model it was made from)")
    verify_onnx_output(Path(a.out_dir))
    source = require_onnx_folder(a.source)
    try:
        first = source.find_source()
    except ModelInputError:
        first = source.files[0]
    batches = check_batches(first, a.images, a.num_images, a.seed, not a.quiet)
    res = check_folder(out, source, batches, tolerance=a.tolerance)
    if a.report:
        with atomic_output_file(Path(a.report), True) as tmp:
            tmp.write_text(json.dumps({"onnx_folder": res.to_dict()}, indent=2, sort_keys=True, default=float) + "\n")
    print(res.summary())
    if a.report:
        print(f"wrote {a.report}")
    if not res.passed:
        raise ParityError(res.summary())
    return 0
