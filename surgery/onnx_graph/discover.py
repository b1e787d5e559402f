"""Discovery on an ONNX model: block-output norms and MLP post-activations exposed as onnxruntime outputs,
fed batch by batch to the same streaming reducer `find` uses on PyTorch models (surgery.core.discovery)."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from ..core.discovery import DiscoveryConfig, DiscoveryResult, NeuronStatistics, layer_range, outlier_mask, summarise
from ..core.errors import ModelInputError
from ..core.output_format import META_PREFIX
from ..core.images import ImageBatches, list_images
from .recognise import VitGraph, block_output, node_label, recognise
from .runtime import ExposedSession
from .sibling_config import configured_image_size

FAMILY_NAME = "onnx"
DEFAULT_PREPROCESS = {"interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                      "crop_pct": 1.0, "crop_mode": "center"}


def static_input_size(vit: VitGraph) -> tuple[int, int, int]:
    """(C, H, W) of the image input: the graph's fixed dims, else (optimum exports: symbolic height and
    width) the `image_size` of the HF config.json next to it (`sibling_config.py`)."""
    x = vit.model.graph.inputs[0]
    dims = list(x.shape) if x.shape is not None else []
    if len(dims) == 4 and all(isinstance(d, int) for d in dims[1:]):
        return int(dims[1]), int(dims[2]), int(dims[3])
    size = configured_image_size(vit.path) if len(dims) == 4 else None
    if size is not None and all(not isinstance(d, int) or d == s for d, s in zip(dims[1:], size)):
        return size
    raise ModelInputError(f"{vit.path}: input '{x.name}' must be [batch, 3, H, W] with fixed C, H, W "
                          f"(has {dims}) or come with a config.json giving image_size")


_WARNED_DEFAULT_PREPROCESS: set[str] = set()  # models already warned about (one warning per model)


def preprocess_config(vit: VitGraph) -> tuple[dict[str, Any], str]:
    """timm transform arguments for the images, and where they came from: preprocessor_config.json next to
    the file or above its onnx/ folder (HF ONNX repos, optimum exports), else vit-surgery's own metadata, else ImageNet defaults at
    the graph's input size (with a warning)."""
    from ..backends.hf.loader import preprocess_from_processor

    size = static_input_size(vit)
    base = dict(DEFAULT_PREPROCESS, input_size=size)
    folders = [vit.path.parent] + ([vit.path.parent.parent] if vit.path.parent.name == "onnx" else [])
    # HF ONNX repos keep onnx/ next to the configs; transformers 5 writes a multimodal processor's image
    # processor inside processor_config.json ("image_processor") instead of preprocessor_config.json
    for proc_file, key in [(d / f, key) for f, key in (("preprocessor_config.json", None),
                                                        ("processor_config.json", "image_processor"))
                           for d in folders if (d / f).is_file()]:
        try:
            raw = json.loads(proc_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelInputError(f"{proc_file}: unreadable ({type(e).__name__})") from None
        if key is not None:
            raw = raw.get(key) if isinstance(raw, dict) else None
            if not isinstance(raw, dict):
                continue  # a processor without an image processor (text only): not about images
        try:
            cfg = preprocess_from_processor(raw, base)
        except (TypeError, ValueError) as e:  # e.g. a non-numeric image_mean
            raise ModelInputError(f"{proc_file}: unusable image processor config ({e})") from None
        if tuple(cfg["input_size"]) != size:
            raise ModelInputError(f"{proc_file} crops to {tuple(cfg['input_size'])[1:]}, the graph takes {size[1:]}")
        return cfg, str(proc_file)
    stored = vit.model.metadata_props.get(META_PREFIX + "preprocess")
    if stored:
        try:
            cfg = dict(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(stored).items()})
            return cfg, "metadata vit_surgery.preprocess"
        except (ValueError, TypeError):
            pass
    if str(vit.path) not in _WARNED_DEFAULT_PREPROCESS:  # once per model, however many passes read it
        _WARNED_DEFAULT_PREPROCESS.add(str(vit.path))
        warnings.warn(f"{vit.path}: no preprocessor_config.json next to the model; using ImageNet mean/std, "
                      f"bicubic resize to {size[1:]}", stacklevel=2)
    return base, "default (ImageNet mean/std)"


def transform_for(vit: VitGraph) -> tuple[Callable, dict[str, Any]]:
    import timm.data

    cfg, origin = preprocess_config(vit)
    tf = timm.data.create_transform(input_size=tuple(cfg["input_size"]), interpolation=cfg["interpolation"],
                                    mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), crop_pct=cfg["crop_pct"],
                                    crop_mode=cfg.get("crop_mode", "center"), is_training=False)
    return tf, {"preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                "preprocess_from": origin}


@dataclass
class TokenLayout:
    num_tokens: int
    num_patches: int
    dtype: str = "float32"  # of the residual stream (float16 inside a float16 graph)

    @property
    def num_prefix(self) -> int:
        return self.num_tokens - self.num_patches


def measure_layout(vit: VitGraph) -> TokenLayout:
    """Token count at the register entry and patch count from the patch-embedding Conv (batch 2 probe)."""
    c, h, w = static_input_size(vit)
    sess = ExposedSession(vit.model, [vit.entry, vit.patch_conv.outputs[0]], str(vit.path))
    try:
        x = np.random.default_rng(0).standard_normal((2, c, h, w)).astype(np.float32)
        _, (entry, conv) = sess.run(x)
    finally:
        sess.close()
    if entry.ndim != 3 or entry.shape[0] != 2 or entry.shape[2] != vit.embed_dim:
        raise ModelInputError(f"{vit.path}: the stream entering block 0 ('{vit.entry.name}') has shape "
                              f"{list(entry.shape)} at batch 2; expected [batch, tokens, {vit.embed_dim}]")
    patches = int(np.prod(conv.shape[2:]))
    layout = TokenLayout(int(entry.shape[1]), patches, str(entry.dtype))
    if not 0 <= layout.num_prefix <= 16:
        raise ModelInputError(f"{vit.path}: {layout.num_tokens} tokens but {patches} patches at "
                              f"{node_label(vit.patch_conv)}: cannot place prefix tokens")
    return layout


def _as_tokens(a: np.ndarray, batch: int, tokens: int, what: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    if t.ndim == 2 and t.shape[0] == batch * tokens:
        t = t.reshape(batch, tokens, -1)
    if t.ndim != 3 or t.shape[0] != batch or t.shape[1] != tokens:
        raise ModelInputError(f"{what} has shape {list(a.shape)}; expected [batch {batch}, tokens {tokens}, width]")
    return t


@torch.inference_mode()
def find_register_neurons_onnx(
    path: str | Path,
    images: str | Path | Iterable[Path],
    config: Optional[DiscoveryConfig] = None,
    *,
    transform: Any = None,
    progress: bool = True,
    provenance: Optional[dict[str, Any]] = None,
) -> DiscoveryResult:
    """`find` on an ONNX file: the same statistics and ranking as surgery.core.discovery, from onnxruntime."""
    cfg = config or DiscoveryConfig()
    vit = recognise(path)
    depth = vit.depth
    detect, score_layers = layer_range(cfg, depth)
    layout = measure_layout(vit)
    p = layout.num_prefix
    prov = dict(provenance or {})
    prov.update({"model": str(path), "onnx": vit.describe(), "num_prefix_tokens": p})
    if transform is None:
        transform, info = transform_for(vit)
        prov.update(info)
    files = list_images(images, cfg.num_images, cfg.seed) if isinstance(images, (str, Path)) else list(images)
    outs = [block_output(vit.mlps[i]) for i in range(detect + 1)]
    hids = [vit.mlps[i].hidden for i in range(score_layers + 1)]
    sess = ExposedSession(vit.model, outs + hids, str(path))
    hidden_sizes = vit.hidden_sizes[: score_layers + 1]
    stats = NeuronStatistics(hidden_sizes, detect + 1, torch.device("cpu"))
    batches = ImageBatches(files, transform, cfg.batch_size, progress=progress, desc="calibrating (onnxruntime)")
    used = 0
    try:
        for pixels, names in batches:
            B = len(pixels)
            _, got = sess.run(pixels.float().numpy())
            norms = [_as_tokens(a, B, layout.num_tokens, f"block {i} output").norm(dim=-1)
                     for i, a in enumerate(got[: detect + 1])]
            hidden = {i: _as_tokens(a, B, layout.num_tokens, f"block {i} MLP activation")
                      for i, a in enumerate(got[detect + 1:])}
            mask, thr = outlier_mask(norms[detect], p, cfg.threshold, cfg.include_prefix)
            stats.update(norms, hidden, mask, thr, p, cfg.sparsity_filter)
            stats.add_histogram(norms[detect][:, p:])
            used += len(names)
    finally:
        sess.close()
    batches.require_some(used)
    return summarise(stats, cfg, detect=detect, score_layers=score_layers, depth=depth, hidden_sizes=hidden_sizes,
                     num_files=len(files), skipped=len(batches.skipped), family_name=FAMILY_NAME, provenance=prov)
