"""Writes a VLM with a baked vision tower as the whole VLM folder, as `save_pretrained` lays it out.

Files: config.json (the VLM's config plus `auto_map` -> modeling_vit_surgery.py for
`AutoModelForImageTextToText` and a `vit_surgery` block: recipe, where the tower is, its token
layout), modeling_vit_surgery.py (torch + transformers only), the weights in the source's layout
(`model.safetensors`, or the same shards + `model.safetensors.index.json`, with the source's tensor
names: the hub's legacy `language_model.model.*` / `vision_tower.vision_model.*` or transformers' own),
the source's
generation config, processor, tokenizer and chat template (copied unchanged: the number of `<image>`
placeholders does not change), surgery.json and README.md.

Only the tower's tensors change: they are the only ones written from memory; every other tensor (language
model, projector) is copied from the source's files byte for byte without being built (a 7B VLM converts
in the memory of its tower), compared with the source's after writing, and the count is recorded in
surgery.json (`unchanged_tensors`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from surgery.core.safetensors_io import ShardedCheckpoint, save_state_dict, write_checkpoint_like

from ...core.bake import register_token_indices
from ...core.errors import ParityError
from ..base import copy_extra_files
from .family import remote_class_name
from .loader import SURGERY_CONFIG_KEY
from .vlm import feature_selection
from .vlm_loader import VLM_MODEL_TYPES
from .vlm_stream import VlmCheckpoint, streamed_checkpoint
from .writer import MODELING_FILE, remote_class_config, remote_modeling_source
from ...core.output_format import write_json

TOWER_PREFIX = "model.vision_tower."  # state-dict keys of the tower inside the VLM


def vlm_class_name(model: nn.Module) -> str:
    for cls in type(model).__mro__:
        if cls.__name__ in VLM_MODEL_TYPES.values() and cls.__module__.startswith("transformers.models."):
            return cls.__name__
    raise ValueError(f"{type(model).__name__} is not one of {sorted(VLM_MODEL_TYPES.values())}")


def _verify_outside_tower(source: nn.Module, path: Path) -> int:
    """Every written tensor outside the tower is the source's, bit for bit (in the written dtype)."""
    from ...core.weights import differing_tensors

    expected = {k: v for k, v in source.state_dict().items() if not k.startswith(TOWER_PREFIX)}
    bad = differing_tensors(path, sorted(expected), expected)
    if bad:
        raise ParityError(f"{len(bad)} written tensor(s) outside the vision tower differ from the source's "
                          f"(first: {bad[0]}); no output written")
    return len(expected)


def _stored_tower_prefix(ckpt: VlmCheckpoint) -> str:
    """How the checkpoint names the tower (`model.vision_tower.`, the hub's `vision_tower.vision_model.`,
    transformers' own `vision_tower.`): the prefix its tower tensors share in place of TOWER_PREFIX."""
    from collections import Counter

    prefixes = Counter(c[: len(c) - len(m) + len(TOWER_PREFIX)] for m, c in ckpt.names.items()
                       if m.startswith(TOWER_PREFIX) and c.endswith(m[len(TOWER_PREFIX):]))
    if not prefixes:
        raise ValueError("the checkpoint's tower tensors are not named after the model's")
    return prefixes.most_common(1)[0][0]


def write_weights_streamed(model: nn.Module, out_dir: Path, ckpt: VlmCheckpoint, surgery: dict[str, Any],
                           cast: Any = None) -> tuple[list[Path], int]:
    """The source's checkpoint layout (files, index, tensor names and dtypes) with the baked tower's
    tensors in place of the source's (new ones, the register branch's, named like the tower's and added
    to the file holding most of the tower); every other tensor's bytes copied from the source files
    without being read into a tensor (`cast`, a dtype other than the source's: read and cast one at a
    time). Returns (files written, tensors verified unchanged)."""
    from collections import Counter

    source_tower = {m: c for m, c in ckpt.names.items() if m.startswith(TOWER_PREFIX)}
    prefix = _stored_tower_prefix(ckpt)
    tower = {(source_tower.get(k) or prefix + k[len(TOWER_PREFIX):]): v
             for k, v in model.state_dict().items() if k.startswith(TOWER_PREFIX)}
    drop = set(source_tower.values()) - set(tower)
    home = Counter(ckpt.files.file_of[c] for c in source_tower.values()).most_common(1)[0][0]
    files = write_checkpoint_like(ckpt.files, out_dir, tower, drop, home, surgery, cast)
    written = ShardedCheckpoint.open(lambda n: out_dir / n if (out_dir / n).is_file() else None)
    assert written is not None
    unchanged = [n for n in ckpt.files.names() if n not in tower and n not in drop]
    if cast is None:
        bad = [n for n in unchanged if not ckpt.files.same_bytes(n, written)]
    else:
        import torch

        bad = [n for n in unchanged if not torch.equal(written.tensor(n), ckpt.files.tensor(n).to(
            cast if ckpt.files.tensor(n).is_floating_point() else ckpt.files.tensor(n).dtype))]
    if bad:
        raise ParityError(f"{len(bad)} written tensor(s) outside the vision tower differ from the source's "
                          f"(first: {bad[0]}); no output written")
    return files, len(unchanged)


def _readme(base: str, recipe: Any, regs: list[int], layer: Any, strategy: str) -> str:
    return (
        f"# {base} with a baked vision tower (vit-surgery)\n\n"
        f"Only the vision tower (`{TOWER_PREFIX[:-1]}`) changed: {recipe.num_registers} test-time register "
        f"token(s) inside the tower (tower token index {', '.join(map(str, regs))}), removed again from the "
        "tower's outputs before the VLM selects its image features "
        f"(vision_feature_layer {layer!r}, strategy {strategy!r}), so the projector sees as many image "
        "features as before. The language model, the projector, the processor, the tokenizer and the "
        "chat template are the source's, unchanged.\n\n"
        f"Register neurons (block: units): {json.dumps(recipe.to_dict()['register_neurons'])}.\n"
        "vit-surgery reads this folder without remote code: `vit-surgery check DIR`.\n")


def write_vlm_dir(model: nn.Module, out_dir: Path, loaded: Any, surgery: dict[str, Any]) -> list[Path]:
    """Save a VLM whose tower is baked (`model`), next to the source's processor files."""
    recipe = model.surgery_recipe
    adapter = loaded.adapter
    base = vlm_class_name(model)
    remote = remote_class_name(base)
    regs = register_token_indices(model, adapter=adapter)
    p_after = adapter.num_prefix_tokens(model)
    layer, strategy = feature_selection(model)
    cfg = remote_class_config(model, remote, "AutoModelForImageTextToText")
    src = loaded.source.to_dict()
    cfg[SURGERY_CONFIG_KEY] = {
        "format": 1,
        "base_class": base,
        "tower": TOWER_PREFIX[:-1],
        "recipe": recipe.to_dict(),
        "num_prefix_tokens": p_after - recipe.num_registers,
        "num_prefix_tokens_with_registers": p_after,
        "register_indices": regs,
        "token_layout": "tower: [CLS, test-time registers, patches]; the registers are removed from the tower's "
                        "outputs before the VLM selects its image features",
        "source": src,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "config.json", out_dir / MODELING_FILE]
    write_json(files[0], cfg)
    files[1].write_text(remote_modeling_source())
    ckpt = streamed_checkpoint(loaded.model)
    if ckpt is not None:  # the source's files, names and layout; only the tower's tensors are written
        from ...core.source import torch_dtype

        out_dtype = next(model.parameters()).dtype
        asked = out_dtype != torch_dtype(loaded.source.dtype)  # --dtype other than the checkpoint's
        weights, count = write_weights_streamed(model, out_dir, ckpt, surgery, out_dtype if asked else None)
        files += weights
    else:  # a pickled source, loaded whole: the model's own names (what the remote class loads)
        files.append(out_dir / "model.safetensors")
        save_state_dict(model.state_dict(), files[2], surgery)
        count = _verify_outside_tower(loaded.model, files[2])
    surgery["unchanged_tensors"] = {
        "outside": TOWER_PREFIX[:-1], "count": count,
        "verified": "bit for bit against the source's tensors (in the written dtype) after writing"}
    surgery["vlm"] = {"class": base, "tower": TOWER_PREFIX[:-1], "vision_feature_layer": layer,
                      "vision_feature_select_strategy": strategy, "unchanged_tensors": count,
                      "image_features": "tower outputs without the register rows (image token count unchanged)"}
    extra = copy_extra_files(loaded, out_dir)  # processor, tokenizer, chat template, generation config
    if not (out_dir / "generation_config.json").exists() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
        extra.append(out_dir / "generation_config.json")
    write_json(out_dir / "surgery.json", surgery)
    (out_dir / "README.md").write_text(_readme(base, recipe, regs, layer, strategy))
    return files + [out_dir / "surgery.json", out_dir / "README.md"] + extra
