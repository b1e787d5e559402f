"""DINOv2 torch-hub checkpoints (facebookresearch/dinov2 layout) loaded into timm's DINOv2 ViT.

`dinov2:PATH` (a .pth/.pt/.safetensors file, or a folder holding one) or a bare path to such a file.
Hub keys (`blocks.i.mlp.fc1`, `blocks.i.ls1.gamma`, `mask_token`, `register_tokens`, SwiGLU `w12`/`w3`)
are mapped by timm's own `checkpoint_filter_fn` and loaded strictly. The architecture is read from the
weights: width, depth, patch size, image size (from the positional table), MLP width, SwiGLU, trained
registers; heads = width / 64 as in every DINOv2 model. The result is an ordinary timm model, so the
baked output is a timm folder (`source.library == "timm"`).

Models with trained registers (`dinov2_vit*14_reg4`) are supported: test-time registers go right after
the trained ones, `[cls, reg x4, test-time registers, patches]`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from ...core.errors import ModelInputError
from ...core.source import LoadedModel, LoadOptions
from ..timm.loader import timm_source
from ..base import adapter_among, needs_full_unpickling, unsafe_pickle_error
from ..timm.loader import ADAPTERS as TIMM_ADAPTERS  # the checkpoint becomes a timm model

PREFIX = "dinov2:"
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
SIZE_NAMES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}
HEAD_DIM = 64


def _read_state_dict(path: Path, spec: str, opts: LoadOptions) -> dict[str, Any]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise ModelInputError(f"{spec}: unreadable safetensors file {path} ({str(e).splitlines()[0]})") from None
    try:
        import zipfile

        # mmap: the tensors stay in the page cache until copied into the model (a zip-format .pth)
        sd = torch.load(path, map_location="cpu", weights_only=not opts.allow_unsafe_pickle,
                        mmap=zipfile.is_zipfile(path))
    except Exception as e:
        msg = str(e)
        if needs_full_unpickling(e):
            raise unsafe_pickle_error(spec) from None
        raise ModelInputError(f"{spec}: unreadable checkpoint {path} ({msg.splitlines()[0] if msg else type(e).__name__})") from None
    if not isinstance(sd, dict):
        raise ModelInputError(f"{spec}: {path} does not hold a state dict")
    for key in ("teacher", "model", "state_dict"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def is_dinov2_hub_state_dict(sd: dict[str, Any]) -> bool:
    return "cls_token" in sd and "pos_embed" in sd and "patch_embed.proj.weight" in sd and any(
        re.match(r"blocks\.\d+\.norm1\.weight", k) for k in sd) and "norm.weight" in sd


def infer_architecture(sd: dict[str, Any], spec: str) -> tuple[str, dict[str, Any]]:
    """(timm architecture, model args) for a DINOv2 hub state dict."""
    import math

    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in sd):
        raise ModelInputError(f"{spec}: chunked DINOv2 blocks (blocks.i.j.*) are not supported; "
                              "use the torch-hub release checkpoints (block_chunks=0)")
    D = int(sd["cls_token"].shape[-1])
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    swiglu = "blocks.0.mlp.w12.weight" in sd
    if swiglu:
        hidden = int(sd["blocks.0.mlp.w12.weight"].shape[0]) // 2
        mlp_ratio = (2 * hidden + 0.5) / D  # timm's SwiGLUPacked takes the packed width (gate + up)
    elif "blocks.0.mlp.fc1.weight" in sd:
        hidden = int(sd["blocks.0.mlp.fc1.weight"].shape[0])
        mlp_ratio = (hidden + 0.5) / D
    else:
        raise ModelInputError(f"{spec}: no blocks.0.mlp.fc1 / w12 weights: not a DINOv2 hub checkpoint")
    n_reg = int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0
    n_pos = int(sd["pos_embed"].shape[1]) - 1  # hub models keep a CLS position
    grid = int(round(math.sqrt(n_pos)))
    if grid * grid != n_pos:
        raise ModelInputError(f"{spec}: positional table of {n_pos} patches is not a square grid")
    if D % HEAD_DIM:
        raise ModelInputError(f"{spec}: width {D} is not a multiple of DINOv2's head size {HEAD_DIM}")
    size = SIZE_NAMES.get(D, "giant" if swiglu else "small")
    if swiglu and size != "giant":
        size = "giant"  # timm's SwiGLU DINOv2 definition; sizes come from the explicit args below
    arch = f"vit_{size}_patch14_{'reg4_' if n_reg else ''}dinov2"
    args: dict[str, Any] = {"img_size": grid * patch, "patch_size": patch, "embed_dim": D, "depth": depth,
                            "num_heads": D // HEAD_DIM, "mlp_ratio": mlp_ratio, "num_classes": 0,
                            "init_values": 1e-5 if "blocks.0.ls1.gamma" in sd else None}
    if n_reg:
        args["reg_tokens"] = n_reg
    return arch, args


def load_dinov2_hub(spec: str, path: Path, opts: LoadOptions, sd: Optional[dict[str, Any]] = None) -> LoadedModel:
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = sd if sd is not None else _read_state_dict(path, spec, opts)
    if not is_dinov2_hub_state_dict(sd):
        raise ModelInputError(f"{spec}: not a DINOv2 torch-hub checkpoint (expected cls_token, pos_embed, "
                              "patch_embed.proj, blocks.i.*, norm)")
    arch, args = infer_architecture(sd, spec)
    img = args["img_size"]
    overlay = {"input_size": (3, img, img), "crop_pct": 1.0, "num_classes": 0}
    from ...core.weights import skip_weight_init

    with skip_weight_init():  # load_state_dict(strict=True) below overwrites every stored tensor
        model = timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=overlay, **args)
    sd = dict(sd)
    stored_dtype = str(sd["patch_embed.proj.weight"].dtype).replace("torch.", "")  # the filter below edits sd
    if "mask_token" not in sd:  # timm's filter recognises the hub layout by this key
        sd["mask_token"] = sd["cls_token"].new_zeros(1, sd["cls_token"].shape[-1])
    try:
        model.load_state_dict(checkpoint_filter_fn(sd, model), strict=True)
    except RuntimeError as e:
        raise ModelInputError(f"{spec}: weights do not match the inferred {arch}: {' '.join(str(e).split())[:300]}") from None
    model.eval()
    source = timm_source(model, arch, args)
    source.pretrained_cfg["input_size"] = [3, img, img]
    source.spec = spec
    source.checkpoint_layout = "dinov2-torch-hub"
    source.dtype = stored_dtype
    fam = adapter_among(TIMM_ADAPTERS, model)
    return LoadedModel(model, fam, spec, source, fam.data_transform(model), None)


def _weights_in(folder: Path, spec: str) -> Path:
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(files) != 1:
        raise ModelInputError(f"{spec}: expected exactly one weights file (.pth/.safetensors) in {folder}, "
                              f"found {len(files)}")
    return files[0]


def dinov2_hub_loader(spec: str, opts: LoadOptions) -> Optional[LoadedModel]:
    if spec.startswith(PREFIX):
        path = Path(spec[len(PREFIX):])
        if not path.exists():
            raise ModelInputError(f"{spec}: file or folder not found: {path}")
        if path.is_dir():
            path = _weights_in(path, spec)
        return load_dinov2_hub(spec, path, opts)
    path = Path(spec)
    if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
        sd = _read_state_dict(path, spec, opts)
        if is_dinov2_hub_state_dict(sd) and ("mask_token" in sd or "blocks.0.ls1.gamma" in sd):
            return load_dinov2_hub(spec, path, opts, sd)
    return None

