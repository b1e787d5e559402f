"""Writes a baked HF transformers model as a folder `AutoModel.from_pretrained(DIR, trust_remote_code=True)` loads.

Files: config.json (the stock config plus `auto_map` -> modeling_vit_surgery.py for AutoConfig and AutoModel,
a `vit_surgery` block with the recipe and token layout, and the stock-refusal marker of stock_refusal.py, so
every stock loader raises instead of returning an unfixed model), modeling_vit_surgery.py (self-contained:
torch + transformers only),
model.safetensors (recipe in the metadata), preprocessor_config.json (so AutoImageProcessor works),
surgery.json and README.md (where the register token sits in `last_hidden_state`).

vit-surgery's own loader reads the same folder without remote code (stock model + recipe + weights).
"""
from __future__ import annotations

import ast
import importlib
import inspect
import json
from pathlib import Path
from typing import Any

from torch import nn

from surgery.core.safetensors_io import save_state_dict

from ...core.bake import register_token_indices
from ...core.output_format import SURGERY_FILE, write_json, write_surgery_json
from ...core.source import SourceInfo
from ..base import adapter_among, copy_extra_files
from .family import vision_families
from .loader import ADAPTERS, SURGERY_CONFIG_KEY
from .stock_refusal import mark_stock_refusal

MODELING_FILE = "modeling_vit_surgery.py"
_TEMPLATE = Path(__file__).with_name("remote_modeling.py")
INLINE_MARK = "# vit-surgery: inline"  # ends the template's `from MODULE import ...` line that gets MODULE's source
STANDALONE_IMPORTS = {"__future__", "dataclasses", "sys", "typing", "torch", "transformers"}
# stock class -> the remote-code class of the folder written from it (the vision family records, family.py)
REMOTE_CLASSES = {stock: remote for family in vision_families() for stock, remote in family.remote_classes.items()}


def stock_class_name(model: nn.Module) -> str:
    """The transformers class a (possibly subclassed) model is built on."""
    for cls in type(model).__mro__:
        if cls.__name__ in REMOTE_CLASSES and cls.__module__.startswith("transformers.models."):
            return cls.__name__
    raise ValueError(f"{type(model).__name__} is not one of {sorted(REMOTE_CLASSES)}")


def _inlined_module(name: str) -> str:
    """`name`'s source without its docstring and `from __future__` line, checked to import only what a
    remote-code file may (torch, transformers, the standard library's dataclasses / typing)."""
    source = inspect.getsource(importlib.import_module(name))
    tree = ast.parse(source)
    drop: set[int] = set()
    for i, node in enumerate(tree.body):
        docstring = i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        if docstring or (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
            drop.update(range(node.lineno, node.end_lineno + 1))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            roots = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if getattr(node, "level", 0) or any(r.split(".")[0] not in STANDALONE_IMPORTS for r in roots):
                raise RuntimeError(f"{name} imports {roots}: it cannot be inlined into a remote-code file")
    kept = [line for n, line in enumerate(source.splitlines(keepends=True), 1) if n not in drop]
    return f"# ---- {name} (inlined by vit-surgery's writer) ----\n" + "".join(kept).strip("\n") + \
        f"\n# ---- end of {name} ----\n"


def remote_modeling_source() -> str:
    """modeling_vit_surgery.py: the template with its marked import line replaced by the imported core
    module's source, so the file needs only torch + transformers and runs the code vit-surgery bakes with."""
    out = []
    for line in _TEMPLATE.read_text().splitlines(keepends=True):
        out.append(_inlined_module(line.split()[1]) if line.rstrip().endswith(INLINE_MARK) else line)
    return "".join(out)


def _processor_config(preprocess: dict[str, Any], model_type: str) -> dict[str, Any]:
    """An HF image-processor config equivalent to the timm-style preprocessing dict."""
    _, h, w = preprocess["input_size"]
    crop_pct = float(preprocess.get("crop_pct", 1.0))
    squash = preprocess.get("crop_mode") == "squash"
    resample = {"nearest": 0, "bilinear": 2, "bicubic": 3}.get(preprocess.get("interpolation", "bicubic"), 3)
    cls = "CLIPImageProcessor" if model_type.startswith("clip") else "BitImageProcessor"
    out: dict[str, Any] = {"image_processor_type": cls, "do_resize": True, "do_rescale": True,
                           "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
                           "image_mean": list(preprocess["mean"]), "image_std": list(preprocess["std"]),
                           "resample": resample}
    if squash:
        out.update(size={"height": h, "width": w}, do_center_crop=False)
    else:
        out.update(size={"shortest_edge": int(round(min(h, w) / crop_pct))}, do_center_crop=True,
                   crop_size={"height": h, "width": w})
    return out


def remote_class_config(model: nn.Module, remote: str, auto_class: str) -> dict[str, Any]:
    """The model's config.json for a folder loaded through our remote-code class `remote` (`auto_class`
    maps to it; AutoConfig to its remote config class): the source's config without loader-local keys or an
    older surgery block, in the weights' dtype, closed to the stock classes (stock_refusal.py)."""
    cfg = model.config.to_dict()
    cfg.pop(SURGERY_CONFIG_KEY, None)
    for k in ("_name_or_path", "_attn_implementation_autoset"):
        cfg.pop(k, None)
    cfg["architectures"] = [remote]
    cfg["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    cfg.pop("attn_implementation", None)  # an older vit-surgery's refusal marker
    cfg["auto_map"] = {"AutoConfig": f"{MODELING_FILE[:-3]}.VitSurgery{type(model.config).__name__}",
                       auto_class: f"{MODELING_FILE[:-3]}.{remote}"}
    return mark_stock_refusal(cfg)


def write_hf_dir(model: nn.Module, out_dir: Path, *, source: SourceInfo, surgery: dict[str, Any],
                 preprocessor_config: dict[str, Any] | None = None) -> list[Path]:
    """Save a baked HF model (CLIPVisionModel / CLIPModel / Dinov2Model / Dinov2WithRegistersModel)."""
    recipe = model.surgery_recipe
    adapter = adapter_among(ADAPTERS, model)
    base = stock_class_name(model)
    remote = REMOTE_CLASSES[base]
    regs = register_token_indices(model, adapter=adapter)
    p_after = adapter.num_prefix_tokens(model)
    p_before = p_after - recipe.num_registers
    cfg = remote_class_config(model, remote, "AutoModel")
    preprocess = adapter.preprocess_config(model)  # type: ignore[attr-defined]
    pre_json = {k: (list(v) if isinstance(v, tuple) else v) for k, v in preprocess.items()}
    src = source.to_dict()
    src.setdefault("preprocess", pre_json)
    cfg[SURGERY_CONFIG_KEY] = {
        "format": 1,
        "base_class": base,
        "recipe": recipe.to_dict(),
        "num_prefix_tokens": p_before,
        "num_prefix_tokens_with_registers": p_after,
        "register_indices": regs,
        "token_layout": "[CLS, trained registers, test-time registers, patches]; "
                        f"patches = last_hidden_state[:, {p_after}:]",
        "source": src,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "config.json", out_dir / MODELING_FILE, out_dir / "model.safetensors",
             out_dir / "preprocessor_config.json", out_dir / SURGERY_FILE, out_dir / "README.md"]
    write_json(files[0], cfg)
    files[1].write_text(remote_modeling_source())
    save_state_dict(model.state_dict(), files[2], surgery)
    proc = dict(preprocessor_config) if preprocessor_config else _processor_config(preprocess, cfg.get("model_type", ""))
    write_json(files[3], proc)
    write_surgery_json(out_dir, surgery)
    reg_text = ", ".join(str(i) for i in regs)
    files[5].write_text(
        f"# {base} with baked test-time registers (vit-surgery)\n\n"
        "```python\nfrom transformers import AutoModel\n"
        "model = AutoModel.from_pretrained(DIR, trust_remote_code=True)  # modeling_vit_surgery.py\n```\n\n"
        f"`last_hidden_state` has {recipe.num_registers} extra token(s): the test-time register(s) at index "
        f"{reg_text}. Layout: [CLS, trained registers, test-time registers, patches]; patch tokens are "
        f"`last_hidden_state[:, {p_after}:]` (or `model.patch_tokens(last_hidden_state)`). `pooler_output` "
        "is unchanged in meaning (from CLS).\n\n"
        f"Register neurons (block: units): {json.dumps(recipe.to_dict()['register_neurons'])}.\n"
        "vit-surgery reads this folder without remote code: `vit-surgery check DIR`.\n")
    return files


def write(model: nn.Module, out: Path, loaded: Any, surgery: dict[str, Any]) -> list[Path]:
    """The backend's writer (see surgery.backends.base.Writer): the HF folder plus the source's extra files."""
    raw = (getattr(loaded, "extra", {}) or {}).get("preprocessor_config") or None
    files = write_hf_dir(model, out, source=loaded.source, surgery=surgery, preprocessor_config=raw)
    return files + copy_extra_files(loaded, out)  # tokenizer / processor files: CLIPProcessor works on OUT

