"""A MODEL that is a folder of ONNX files: an HF ONNX repo (`config.json`, `preprocessor_config.json`,
`onnx/model.onnx` + `model_fp16.onnx`, `model_quantized.onnx`, `model_int8.onnx`, `model_uint8.onnx`,
`model_q4.onnx`, ... as transformers.js picks them by `dtype`) or a plain folder of `.onnx` files.

A VLM's ONNX folder (transformers.js / onnx-community: `onnx/vision_encoder.onnx` + its variants, next to
`embed_tokens.onnx`, `decoder_model_merged.onnx`, ...): the vision encoder's files are rewritten (their
`image_features` keep the source's token count, `vision_encoder.py`), the language side's files
(`LANGUAGE_SIDE_GROUPS`, any precision suffix) are copied byte for byte: the registers never reach them.

Neurons are found once, on the fp32 file of a group (`model.onnx` for `model_*.onnx`); every file of the
folder is then rewritten with the same recipe into the same relative path under OUT, with every other file
(configs, tokenizer, README) copied, so a runtime loads OUT by the same names as the source. A file that
cannot be rewritten makes the whole conversion fail, naming each such file and why: none is dropped or left
unfixed silently. Each rewritten file is checked against its own source's hooked reference (tolerance of
its precision) and, where the group has an fp32 file, against the fp32 hooked reference (`variants.py`).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import onnx_ir as ir
import torch

from ..core.errors import ModelInputError, ParityError
from ..core.recipe import Recipe
from ..core.verdict import all_passed, verdict_word
from .bake import bake_graph
from .check import OnnxCheckReport, check_onnx, read_recipe
from .discover import measure_layout
from .recognise import load_ir, recognise
from .precision import precision_of
from .variants import Fp32Judgement, judge_against_fp32

ONNX_SUBDIR = "onnx"
# transformers.js / optimum file suffixes of a model's precision variants (longest first when matching)
VARIANT_SUFFIXES = ("_q4f16", "_quantized", "_uint8", "_int8", "_fp16", "_bnb4", "_q4", "_q8")
# a VLM folder's language-side graphs (transformers.js file groups): copied unchanged next to a vision encoder
VISION_ENCODER_GROUP = "vision_encoder"
LANGUAGE_SIDE_GROUPS = ("embed_tokens", "decoder_model_merged", "decoder_model", "decoder_with_past_model",
                        "encoder_model")
_TORCH_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt")
# protobuf cannot hold 2 GiB; above this (or when the source had external data) weights go to a data file
EXTERNAL_DATA_THRESHOLD = 2**31 - 64 * 2**20


def onnx_files_dir(folder: Path) -> Optional[Path]:
    for d in (folder / ONNX_SUBDIR, folder):
        if d.is_dir() and any(d.glob("*.onnx")):
            return d
    return None


def is_onnx_folder(spec: Optional[str]) -> bool:
    """A folder holding `.onnx` files (directly or in onnx/) and no PyTorch weights: a model vit-surgery
    rewrites as graphs. A folder with both (an HF repo shipping safetensors and onnx/) is a PyTorch model."""
    if not spec:
        return False
    p = Path(spec)
    if not p.is_dir() or onnx_files_dir(p) is None:
        return False
    return not any(any(p.glob(pat)) for pat in _TORCH_WEIGHTS)


def group_of(path: Path) -> str:
    """`model_fp16.onnx` -> `model`; `vision_encoder_q4.onnx` -> `vision_encoder`; `model.onnx` -> `model`."""
    stem = path.stem
    for suf in VARIANT_SUFFIXES:
        if stem.endswith(suf) and len(stem) > len(suf):
            return stem[: -len(suf)]
    return stem


@dataclass
class OnnxFolder:
    root: Path
    files: list[Path]  # every .onnx file to rewrite, sorted
    copied: list[Path] = field(default_factory=list)  # a VLM's language-side .onnx files, copied unchanged

    def rel(self, p: Path) -> Path:
        return p.relative_to(self.root)

    def fp32_of(self, p: Path) -> Optional[Path]:
        """The group's fp32 file (`model.onnx` for `model_fp16.onnx`), when the folder has it."""
        base = p.parent / f"{group_of(p)}.onnx"
        return base if base in self.files else None

    def find_source(self) -> Path:
        """The file `find` runs on: `model.onnx`, else the only group's fp32 file."""
        bases = sorted({f for f in (self.fp32_of(p) for p in self.files) if f is not None})
        named = [b for b in bases if b.name == "model.onnx"]
        if named or len(bases) == 1:
            return (named or bases)[0]
        if not bases:
            raise ModelInputError(f"{self.root}: no fp32 ONNX file (model.onnx) to find register neurons on; "
                                  "pass {neurons} FILE", parameters=("neurons",))
        raise ModelInputError(f"{self.root}: several fp32 ONNX files ({', '.join(str(self.rel(b)) for b in bases)}); "
                              "find on one of them and pass {neurons} FILE", parameters=("neurons",))


def refuse_unreadable_entries(root: Path) -> None:
    """Every file of the folder is copied or rewritten: a dangling link, a link loop or a special file
    (FIFO, socket, device) among them is refused now (exit 4), before any work, never met mid-copy."""
    import os
    import stat

    for folder, dirs, names in os.walk(root, followlinks=False):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            path = Path(folder) / name
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts):
                continue
            try:
                mode = path.stat().st_mode  # follows links: a dangling one or a loop raises
            except (OSError, RuntimeError) as e:
                raise ModelInputError(f"{root}: {rel} cannot be read ({'a link loop' if isinstance(e, RuntimeError) or getattr(e, 'errno', 0) == 40 else 'a dangling link' if path.is_symlink() else e.strerror}); "
                                      "remove it or point it at a file") from None
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ModelInputError(f"{root}: {rel} is a special file (FIFO, socket or device), not a model file; "
                                      "remove it")


def open_folder(spec: str | Path) -> OnnxFolder:
    root = Path(spec)
    refuse_unreadable_entries(root)
    d = onnx_files_dir(root)
    if d is None:
        raise ModelInputError(f"{root}: no .onnx files in it or in {root / ONNX_SUBDIR}")
    files = sorted(d.glob("*.onnx"))
    if any(group_of(f) == VISION_ENCODER_GROUP for f in files):  # a VLM: only its vision encoder sees images
        copied = [f for f in files if group_of(f) in LANGUAGE_SIDE_GROUPS]
        return OnnxFolder(root, [f for f in files if f not in copied], copied)
    return OnnxFolder(root, files)


def _data_files(model: ir.Model) -> set[str]:
    return {v.const_value.location for v in model.graph.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)}


def _weights_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _remove_unused(model: ir.Model) -> None:
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)


def rewrite_file(source: Path, target: Path, recipe: Recipe) -> dict[str, Any]:
    """Bake `recipe` into `source`, saved as `target` (external data under the source's data-file name, or
    `<name>_data` as transformers.js expects when a large model had none). Returns the bake summary."""
    vit = recognise(source)
    layout = measure_layout(vit)
    precision = precision_of(vit, layout)
    data = sorted(_data_files(vit.model))
    if len(data) > 1:
        raise ModelInputError(f"{source}: weights spread over several external data files {data}")
    summary = bake_graph(vit, recipe, layout, source=str(source))
    vit.model.metadata_props["vit_surgery.precision"] = precision
    _remove_unused(vit.model)
    if not data and _weights_bytes(vit.model) > EXTERNAL_DATA_THRESHOLD:
        data = [f"{target.name}_data"]
    target.parent.mkdir(parents=True, exist_ok=True)
    ir.save(vit.model, str(target), external_data=data[0] if data else None)
    return dict(summary, precision=precision)


@dataclass
class FolderCheck:
    reports: dict[str, OnnxCheckReport] = field(default_factory=dict)
    judgements: dict[str, Fp32Judgement] = field(default_factory=dict)
    unchanged: dict[str, bool] = field(default_factory=dict)  # a VLM's language-side files: byte-identical?

    @property
    def passed(self) -> bool:
        return all_passed(self.reports.values()) and all_passed(self.judgements.values()) and all(self.unchanged.values())

    def failures(self) -> list[str]:
        out = [f"{k}: {r.summary()}" for k, r in self.reports.items() if not r.passed]
        out += [f"{k}: differs from the source (a language-side file must be copied unchanged)"
                for k, same in self.unchanged.items() if not same]
        return out + [f"{k}: {j.summary()}" for k, j in self.judgements.items() if not j.passed]

    def summary(self) -> str:
        head = f"onnx folder check {verdict_word(self.passed)}"
        if not self.passed:
            return f"{head}: " + " | ".join(self.failures())
        worst = {k: f"{r.worst.relative:.1e} <= {r.tolerance:g}" for k, r in self.reports.items() if r.worst}
        return (f"{head} ({len(self.reports)} file(s), each against its own hooked reference: "
                + ", ".join(f"{k} {v}" for k, v in worst.items())
                + (f"; {len(self.judgements)} variant(s) also against the fp32 hooked reference" if self.judgements
                   else "")
                + (f"; {len(self.unchanged)} language-side file(s) unchanged" if self.unchanged else "") + ")")

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "files": {k: r.to_dict() for k, r in self.reports.items()},
                "against_fp32": {k: j.to_dict() for k, j in self.judgements.items()},
                "copied_unchanged": self.unchanged, "summary": self.summary()}


def check_folder(out: OnnxFolder, source: OnnxFolder, batches: list[torch.Tensor], *,
                 tolerance: float, recipe: Optional[Recipe] = None) -> FolderCheck:
    """Every rewritten file against its source's hooked reference (same relative path) and, for variants
    of a group with an fp32 file, against the fp32 hooked reference."""
    res = FolderCheck()
    src_by_rel = {str(source.rel(p)): p for p in source.files}
    for p in out.files:
        key = str(out.rel(p))
        src = src_by_rel.get(key)
        if src is None:
            raise ModelInputError(f"{out.root}: {key} has no counterpart in the source folder {source.root}")
        r = recipe or read_recipe(p)
        res.reports[key] = check_onnx(p, src, batches, tolerance=tolerance, recipe=r)
        base = source.fp32_of(src)
        if base is not None and base != src:
            res.judgements[key] = judge_against_fp32(p, src, base, batches, r)
    missing = sorted(set(src_by_rel) - {str(out.rel(p)) for p in out.files})
    if missing:
        raise ModelInputError(f"{out.root}: the source's {', '.join(missing)} not rewritten")
    for p in source.copied:
        key = str(source.rel(p))
        target = out.root / key
        res.unchanged[key] = target.is_file() and _same_bytes(p, target)
    return res


def _same_bytes(a: Path, b: Path, chunk: int = 1 << 24) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def convert_folder(source: OnnxFolder, tmp: Path, recipe: Recipe, *,
                   check_batches: Optional[list[torch.Tensor]], tolerance: float,
                   say: Callable[[str], None] = lambda m: None) -> tuple[dict[str, Any], Optional[FolderCheck]]:
    """Write the rewritten folder into `tmp` (the caller moves it into place): every .onnx file rewritten,
    every other file copied. Raises ModelInputError naming every file that cannot be rewritten, ParityError
    when a check fails."""
    refused: list[str] = []
    summaries: dict[str, Any] = {}
    data_names: set[str] = set()
    for p in source.files:
        key = str(source.rel(p))
        try:
            data_names |= _data_files(load_ir(p))
            summaries[key] = rewrite_file(p, tmp / key, recipe)
            say(f"rewrote {key} ({summaries[key]['precision']})")
        except ModelInputError as e:  # keep going: name every file that cannot be rewritten
            refused.append(f"{key}: {str(e).replace(str(p) + ': ', '')}")
    if refused:
        raise ModelInputError(f"{source.root}: {len(refused)} of {len(source.files)} ONNX file(s) cannot be "
                              f"rewritten, nothing written: " + " | ".join(refused))
    for p in source.copied:
        say(f"copied {source.rel(p)} unchanged (the VLM's language side)")
    onnx_dir = source.files[0].parent
    skip = {p.resolve() for p in source.files} | {(onnx_dir / d).resolve() for d in data_names}
    for f in sorted(source.root.rglob("*")):
        rel = f.relative_to(source.root)
        if f.is_dir() or any(part.startswith(".") for part in rel.parts) or f.resolve() in skip:
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, tmp / rel)
    check = None
    if check_batches is not None:
        check = check_folder(open_folder(tmp), source, check_batches, tolerance=tolerance, recipe=recipe)
        if not check.passed:
            raise ParityError(f"the rewritten ONNX folder failed the check, nothing written: {check.summary()}")
    return summaries, check


def require_onnx_folder(spec: str | Path) -> OnnxFolder:
    if not is_onnx_folder(str(spec)):
        raise ModelInputError(f"{spec}: not a folder of ONNX files (or it also holds PyTorch weights)")
    return open_folder(spec)
