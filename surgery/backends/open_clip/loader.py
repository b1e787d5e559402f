"""Loading open_clip models: `open_clip:ARCH/PRETRAINED`, `open_clip:hf-hub:ORG/NAME`,
`open_clip:local-dir:PATH` and folders holding `open_clip_config.json` (among them folders written by
`vit-surgery convert`, which carry baked test-time registers).

Everything goes through open_clip's own `create_model_and_transforms` code path. The LoadedModel's
`model` is the image tower (`clip.visual`, an open_clip VisionTransformer); the whole CLIP model is
kept in `extra["clip"]` so the exporter can write it back with the text tower untouched.

OpenAI weights were trained with QuickGELU. open_clip's plain arch names (`ViT-B-16`) build
nn.GELU and only warn when paired with a QuickGELU tag (`openai`, `metaclip_*`, `dfn2b`, ...); this
loader builds QuickGELU whenever the tag's pretrained config says so.

The one documented call for a converted folder is `surgery.open_clip_load(OUT) -> (model, preprocess)`.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from torch import nn

from ...core.errors import ModelInputError, first_line
from ...core.output_format import SURGERY_FILE, read_surgery_json
from ...core.source import LoadedModel, LoadOptions, SourceInfo
from ...core.recipe import Recipe
from ..base import adapter_among, extra_files, hub_file, needs_full_unpickling, unsafe_pickle_error
from .adapter import OPEN_CLIP, unsupported_reason
from .timm_trunk import OPEN_CLIP_TIMM

ADAPTERS = (OPEN_CLIP, OPEN_CLIP_TIMM)  # open_clip's VisionTransformer; timm trunks inside its TimmModel

PREFIX = "open_clip:"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
SURGERY_NAME = SURGERY_FILE
_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                 "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")


@dataclass
class OpenClipSpec:
    """What the user typed, resolved into open_clip's create_model arguments."""

    spec: str
    model_name: str  # arch name or 'hf-hub:ORG/NAME' / 'local-dir:PATH'
    pretrained: Optional[str]  # tag or file (only with a plain arch name)
    force_quick_gelu: bool = False


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs INFO/WARNING through the root logger (e.g. 'initialized randomly' for a skeleton
    that is filled right after); keep those out of the CLI output."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


def resolve_spec(spec: str) -> OpenClipSpec:
    """`open_clip:ARCH/TAG` | `open_clip:hf-hub:ORG/NAME` | `open_clip:local-dir:PATH` -> create_model args.

    QuickGELU: when the tag's pretrained config was trained with QuickGELU and the arch config does not
    already say so, `force_quick_gelu` is set (open_clip itself only warns and builds nn.GELU)."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    if not spec.startswith(PREFIX):
        raise ModelInputError(f"not an open_clip model name: {spec!r}")
    rest = spec[len(PREFIX):].strip()
    if not rest:
        raise ModelInputError("open_clip: needs a model, e.g. open_clip:ViT-B-16/laion2b_s34b_b88k or "
                              "open_clip:hf-hub:ORG/NAME")
    if rest.startswith("hf-hub:"):
        if rest.count("/") != 1 or rest.endswith("/"):
            raise ModelInputError(f"{spec}: expected open_clip:hf-hub:ORG/NAME")
        return OpenClipSpec(spec, rest, None)
    if rest.startswith("local-dir:"):
        path = Path(rest[len("local-dir:"):])
        if not path.is_dir():
            raise ModelInputError(f"model folder not found: {path}")
        return OpenClipSpec(spec, rest, None)
    arch, _, tag = rest.partition("/")
    arch, tag = arch.strip(), tag.strip()
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see open_clip.list_models())"
        raise ModelInputError(f"{spec}: unknown open_clip architecture {arch!r}{hint}")
    tags = list_pretrained_tags_by_model(arch)
    if not tag:
        raise ModelInputError(f"{spec}: name the pretrained weights, open_clip:{arch}/TAG "
                              f"(tags for {arch}: {', '.join(tags) or 'none'}), or use open_clip:hf-hub:ORG/NAME")
    pcfg = get_pretrained_cfg(arch, tag)
    if not pcfg:
        if Path(tag).is_file():
            return OpenClipSpec(spec, arch, tag)
        raise ModelInputError(f"{spec}: unknown pretrained tag {tag!r} for {arch} "
                              f"(tags: {', '.join(tags) or 'none'})")
    quick = bool(pcfg.get("quick_gelu", False)) and not bool(cfg.get("quick_gelu", False))
    return OpenClipSpec(spec, arch, tag, force_quick_gelu=quick)


def _model_cfg(rs: OpenClipSpec) -> dict[str, Any]:
    """The model config open_clip built from (with the QuickGELU decision applied), for export."""
    import open_clip

    if rs.model_name.startswith("hf-hub:"):
        from open_clip.factory import _get_hf_config

        cfg = copy.deepcopy(_get_hf_config(rs.model_name[len("hf-hub:"):])["model_cfg"])
    elif rs.model_name.startswith("local-dir:"):
        data = json.loads((Path(rs.model_name[len("local-dir:"):]) / CONFIG_NAME).read_text(encoding="utf-8"))
        cfg = copy.deepcopy(data["model_cfg"])
    else:
        cfg = copy.deepcopy(open_clip.get_model_config(rs.model_name))
    if rs.force_quick_gelu:
        cfg["quick_gelu"] = True
    return cfg


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def _map_error(spec: str, e: BaseException) -> Exception:
    text = str(e)
    msg = first_line(e)
    if needs_full_unpickling(e):
        return unsafe_pickle_error(spec)
    if "size mismatch" in text or "Missing key" in text or "Unexpected key" in text:
        return ModelInputError(f"{spec}: weights do not match the model config: {' '.join(text.split())[:300]}")
    if "Last error" in msg:  # open_clip's download errors append huggingface_hub's whole explanation
        msg = msg.split(". Last error")[0]
    if ("download" in text.lower() or "hub" in text.lower() or "offline" in text.lower()
            or isinstance(e, (OSError, ConnectionError))):
        return ModelInputError(f"{spec}: could not get the pretrained weights ({msg[:300]}); with no network, use a "
                               "local folder (open_clip_config.json + open_clip_model.safetensors) or a populated "
                               "HF hub cache (HF_HUB_CACHE, HF_HUB_OFFLINE=1)")
    return ModelInputError(f"{spec}: could not load: {msg[:300]}")


def check_model_cfg(spec: str, cfg: Any) -> None:
    """Refuse, from the model config alone, image towers vit-surgery cannot bake exactly (no download needed)."""
    vision = cfg.get("vision_cfg", {}) if isinstance(cfg, dict) else {}
    if not isinstance(vision, dict):
        return
    # timm trunks (SigLIP, EVA02, PE-Core): supported when the built trunk is a timm ViT / Eva (check_image_tower)
    if isinstance(vision.get("layers"), (list, tuple)):
        raise ModelInputError(f"{spec}: the image tower is a ResNet (ModifiedResNet), not a Vision Transformer")
    if vision.get("scale_fc"):
        raise ModelInputError(f"{spec}: unsupported open_clip image tower: its MLPs normalise the hidden layer "
                              "(scale_fc=True, NormFormer): the LayerNorm mixes all hidden units, so register neurons "
                              "cannot be split off exactly")


def check_image_tower(spec: str, clip: nn.Module) -> nn.Module:
    """The CLIP model's image tower if vit-surgery can bake it exactly, else a ModelInputError saying why."""
    visual = getattr(clip, "visual", None)
    if visual is None:
        raise ModelInputError(f"{spec}: open_clip model {type(clip).__name__} has no image tower (.visual)")
    if OPEN_CLIP.matches(visual):
        why = unsupported_reason(visual)
        if why:
            raise ModelInputError(f"{spec}: unsupported open_clip image tower: {why}")
        return visual
    if OPEN_CLIP_TIMM.matches(visual):  # timm trunk (ViT or Eva) inside open_clip's TimmModel
        return visual
    kind = type(visual).__name__
    if kind == "TimmModel":
        tname = type(getattr(visual, "trunk", None)).__name__
        raise ModelInputError(f"{spec}: not supported: its image tower is a timm {tname} (not a Vision Transformer "
                              "vit-surgery has an adapter for) wrapped by open_clip's TimmModel")
    if kind == "ModifiedResNet":
        raise ModelInputError(f"{spec}: the image tower is a ResNet (ModifiedResNet), not a Vision Transformer")
    raise ModelInputError(f"{spec}: unsupported open_clip image tower {kind} (vit-surgery bakes open_clip's "
                          "VisionTransformer)")


def _loaded(spec: str, clip: nn.Module, transform: Callable, source: SourceInfo,
            recipe: Optional[Recipe] = None, files: Optional[dict[str, str]] = None) -> LoadedModel:
    visual = check_image_tower(spec, clip)
    clip.eval()
    return LoadedModel(visual, adapter_among(ADAPTERS, visual), spec, source, transform, recipe,
                       extra={"clip": clip, "extra_files": files or {}})


def _load_spec(rs: OpenClipSpec, opts: LoadOptions, display: Optional[str] = None) -> LoadedModel:
    import open_clip  # noqa: F401  (a missing open_clip fails here, before the errors below are mapped)

    spec = display or rs.spec
    try:
        model_cfg = _model_cfg(rs)
    except Exception as e:
        raise _map_error(spec, e) from None
    check_model_cfg(spec, model_cfg)  # refuse before downloading weights
    try:
        clip, preprocess = _create_streamed(rs, opts) or _create(rs, opts)
    except Exception as e:
        raise _map_error(spec, e) from None
    check_image_tower(spec, clip)
    source = SourceInfo("open_clip", spec=spec, model_name=rs.model_name, pretrained=rs.pretrained,
                        quick_gelu=bool(model_cfg.get("quick_gelu", False)), model_cfg=_jsonable(model_cfg),
                        preprocess_cfg=_jsonable(dict(clip.visual.preprocess_cfg)), dtype=_stored_dtype(rs))
    return _loaded(spec, clip, preprocess, source, files=_extra_files(rs))


def _create(rs: OpenClipSpec, opts: LoadOptions) -> tuple[nn.Module, Callable]:
    import open_clip

    with _quiet_open_clip():
        clip, _, preprocess = open_clip.create_model_and_transforms(
            rs.model_name, pretrained=rs.pretrained, force_quick_gelu=rs.force_quick_gelu,
            device=opts.device, weights_only=not opts.allow_unsafe_pickle)
    return clip, preprocess


def _create_streamed(rs: OpenClipSpec, opts: LoadOptions) -> Optional[tuple[nn.Module, Callable]]:
    """A local open_clip folder with safetensors weights: the skeleton is built without random init and
    filled tensor by tensor (surgery/core/weights.py), so loading costs one model instead of two. None when
    the folder is not that simple case (open_clip's own loader handles the rest)."""
    import open_clip

    from ...core.weights import load_safetensors_streamed, skip_weight_init

    if not rs.model_name.startswith("local-dir:"):
        return None
    root = Path(rs.model_name[len("local-dir:"):])
    weights = next((root / n for n in _WEIGHT_FILES if n.endswith(".safetensors") and (root / n).is_file()), None)
    if weights is None:
        return None
    with _quiet_open_clip(), skip_weight_init():
        clip, _, preprocess = open_clip.create_model_and_transforms(
            rs.model_name, pretrained=rs.pretrained, force_quick_gelu=rs.force_quick_gelu, load_weights=False)
    try:
        load_safetensors_streamed(clip, weights, cast=False)
    except RuntimeError:  # keys open_clip's loader would adapt: let it
        return None
    return clip.to(opts.device), preprocess


def _stored_dtype(rs: OpenClipSpec) -> str:
    from ...core.source import safetensors_dtype

    files: list[Optional[Path]] = []
    if rs.model_name.startswith("hf-hub:"):
        files = [hub_file(rs.model_name[len("hf-hub:"):], n) for n in _WEIGHT_FILES if n.endswith(".safetensors")]
    elif rs.model_name.startswith("local-dir:"):
        files = [Path(rs.model_name[len("local-dir:"):]) / n for n in _WEIGHT_FILES]
    return next((d for d in map(safetensors_dtype, files) if d), "float32")


def _extra_files(rs: OpenClipSpec) -> dict[str, str]:
    if rs.model_name.startswith("hf-hub:"):
        repo = rs.model_name[len("hf-hub:"):]
        return extra_files(lambda n: hub_file(repo, n))
    if rs.model_name.startswith("local-dir:"):
        root = Path(rs.model_name[len("local-dir:"):])
        return extra_files(lambda n: root / n)
    return {}


# ---- folders written by vit-surgery convert --------------------------------------------------------

def read_surgery_doc(path: Path) -> Optional[dict[str, Any]]:
    return read_surgery_json(path)


def build_baked_clip(path: str | Path, device: str = "cpu", image_tower_only: bool = False
                     ) -> tuple[nn.Module, Callable, dict[str, Any]]:
    """Rebuild a converted open_clip folder: open_clip builds the skeleton from open_clip_config.json,
    the recipe from surgery.json bakes the image tower's structure, then the weights load strictly."""
    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from ...core.bake import bake_registers
    from ...core.weights import load_safetensors_streamed, load_safetensors_subset

    path = Path(path)
    spec = str(path)
    if not (path / CONFIG_NAME).is_file():
        raise ModelInputError(f"{path}: no {CONFIG_NAME} (not an open_clip model folder)")
    doc = read_surgery_doc(path)
    if doc is None:
        raise ModelInputError(f"{path}: no {SURGERY_NAME}: not a folder written by vit-surgery convert")
    recipe = Recipe.from_dict(doc["recipe"], source=str(path / SURGERY_NAME))
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelInputError(f"{path}: no {WEIGHTS_NAME}")
    try:
        with _quiet_open_clip():
            if image_tower_only:  # no memory and no random init for what is not loaded
                with torch.device("meta"):
                    clip = open_clip.create_model(f"local-dir:{path}", load_weights=False, device="meta")
                tower = check_image_tower(spec, clip)
                stored = set(tower.state_dict())
                if any(name not in stored for name, _ in tower.named_buffers()):
                    image_tower_only = False  # computed buffers (RoPE tables): build it for real
                else:
                    tower.to_empty(device=device)
            if not image_tower_only:
                clip = open_clip.create_model(f"local-dir:{path}", load_weights=False, device=device)
    except Exception as e:
        raise _map_error(spec, e) from None
    visual = check_image_tower(spec, clip)
    bake_registers(visual, recipe, adapter=adapter_among(ADAPTERS, visual))
    try:  # tensor by tensor, in the dtype it was written in
        if image_tower_only:
            clip.weights_not_loaded = load_safetensors_subset(clip, weights, "visual.", device, map_file=True)
        else:
            load_safetensors_streamed(clip, weights, device)
    except Exception as e:
        raise _map_error(spec, e) from None
    clip.eval()
    preprocess = image_transform_v2(PreprocessCfg(**visual.preprocess_cfg), is_train=False)
    return clip, preprocess, doc


def open_clip_load(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Callable]:
    """Load a folder written by `vit-surgery convert` from an open_clip model.

    Returns `(model, preprocess)` like `open_clip.create_model_from_pretrained`: an open_clip CLIP
    whose `encode_image` carries the baked test-time registers (text tower untouched, so zero-shot
    classification works unchanged) and open_clip's eval transform. Tokenizer:
    `open_clip.get_tokenizer(f"local-dir:{path}")`.
    """
    clip, preprocess, _ = build_baked_clip(path, device)
    return clip, preprocess


def is_open_clip_folder(path: Path) -> bool:
    """A folder open_clip can load: open_clip_config.json plus open_clip weights or a vit-surgery surgery.json."""
    if not (path / CONFIG_NAME).is_file():
        return False
    return any((path / n).is_file() for n in _WEIGHT_FILES) or (path / SURGERY_NAME).is_file()


def _load_folder(spec: str, path: Path, opts: LoadOptions) -> LoadedModel:
    doc = read_surgery_doc(path)
    if doc is None:  # an ordinary open_clip folder (hf-hub snapshot layout): open_clip's local-dir path
        return _load_spec(OpenClipSpec(spec, f"local-dir:{path}", None), opts, display=spec)
    clip, preprocess, doc = build_baked_clip(path, opts.device, opts.convert_check)
    source = SourceInfo.from_dict(doc.get("source") or {}, "open_clip")
    loaded = _loaded(spec, clip, preprocess, source, clip.visual.surgery_recipe,
                     files=_extra_files(OpenClipSpec(spec, f"local-dir:{path}", None)))
    if opts.convert_check:
        loaded.extra["weights_not_loaded"] = (path / WEIGHTS_NAME, getattr(clip, "weights_not_loaded", []))
    return loaded


def open_clip_loader(spec: str, opts: LoadOptions) -> Optional[LoadedModel]:
    if spec.startswith(PREFIX):
        rs = resolve_spec(spec)
        if rs.model_name.startswith("local-dir:"):
            return _load_folder(spec, Path(rs.model_name[len("local-dir:"):]), opts)
        return _load_spec(rs, opts)
    if ":" in spec.split("/")[0] and not Path(spec).exists():
        return None  # another library's prefix
    path = Path(spec)
    if path.is_dir() and is_open_clip_folder(path):
        return _load_folder(spec, path, opts)
    return None

