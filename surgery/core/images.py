"""Calibration images: listing, seeded sampling, robust decoding and batching.

Unreadable files (corrupt, truncated, zero-byte, not an image) are skipped and counted; odd modes
(grayscale, RGBA, palette, 16-bit) are converted to RGB; very large images are decoded reduced.
"""
from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

if TYPE_CHECKING:  # torch is imported when batches are made: listing images (argument checks) needs none
    import torch

from .errors import ImageInputError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
# Decoding a huge image fully only to shrink it to 224 px wastes memory: JPEGs larger than this are
# decoded at 1/2..1/8 scale (draft mode); other formats cannot be decoded reduced, so past MAX_PIXELS
# (about 100 MB as RGB) they are skipped as unreadable with a reason instead of being decoded.
MAX_PIXELS = 32_000_000
ImageFile.LOAD_TRUNCATED_IMAGES = False


def list_images(folder: str | Path, num_images: int | None = None, seed: int = 0) -> list[Path]:
    """Image files under `folder` (recursive, sorted); a seeded sample of `num_images` if given."""
    root = Path(folder)
    if not root.exists():
        raise ImageInputError(f"image folder not found: {root}")
    if not root.is_dir():
        raise ImageInputError(f"not a folder: {root}")
    files = sorted(p for p in _walk(root) if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ImageInputError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {root}")
    if num_images is not None and 0 < num_images < len(files):
        files = sorted(random.Random(seed).sample(files, num_images))
    return files


def _walk(root: Path) -> Iterator[Path]:
    """Files under `root`, following symbolic links to folders; a folder reached twice (a link loop, or two
    links to one folder) is read once."""
    seen: set[tuple[int, int]] = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            subfolders.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        subfolders.sort()
        for name in names:
            path = Path(folder) / name
            if path.is_file():
                yield path


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB (16-bit and float images are rescaled to their value range)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def load_image(path: Path, max_side: int = 2048) -> Image.Image:
    """Decode one image to RGB; raises OSError/ValueError subclasses for unreadable files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if img.format == "JPEG" and max(img.size) > 2 * max_side:
                img.draft("RGB", (max_side, max_side))
            if img.width * img.height > MAX_PIXELS:
                raise ValueError(f"image too large to decode ({img.width}x{img.height} {img.format}, more than "
                                 f"{MAX_PIXELS // 1_000_000} megapixels); downscale it first")
            img.load()
            if max(img.size) > max_side:
                img.thumbnail((max_side, max_side))
            return to_rgb(img)


@dataclass
class ImageBatches:
    """Iterates (pixels [B,3,H,W], paths) batches, skipping unreadable files and counting them."""

    files: list[Path]
    transform: Callable
    batch_size: int = 8
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    progress: bool = True
    desc: str = "images"

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[Path]]]:
        import torch

        from .progress import iterate

        self.skipped.clear()
        batch: list[torch.Tensor] = []
        paths: list[Path] = []
        # a stage of surgery/core/progress.py: a bar on a terminal, one line otherwise, logging in the API
        files = iterate(self.files, self.desc, unit="image") if self.progress else iter(self.files)
        for path in files:
            try:
                img = load_image(path)
            except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError) as e:
                self.skipped.append((path, f"{type(e).__name__}: {e}"))
                continue
            batch.append(self.transform(img))
            paths.append(path)
            if len(batch) == self.batch_size:
                yield torch.stack(batch), paths
                batch, paths = [], []
        if batch:
            yield torch.stack(batch), paths
        if hasattr(files, "close"):
            files.close()
        if self.skipped:
            warnings.warn(f"skipped {len(self.skipped)} unreadable image(s), e.g. {self.skipped[0][0]}: "
                          f"{self.skipped[0][1]}", stacklevel=2)

    def require_some(self, used: int) -> None:
        if used == 0:
            raise ImageInputError(f"none of the {len(self.files)} image file(s) could be read "
                                  f"(first error: {self.skipped[0][0]}: {self.skipped[0][1]})" if self.skipped
                                  else "no images to process")


def split_batches(pixels: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """`pixels` [N, ...] cut into consecutive batches of `sizes`; the last is shorter, and the sizes past
    N are dropped, when the images run out. The one re-batching helper: the checks run at several batch
    sizes so that a graph fixed to one batch size fails."""
    out, start = [], 0
    for s in sizes:
        if start >= len(pixels):
            break
        out.append(pixels[start:start + s])
        start += s
    return out


def with_another_batch_size(batches: Sequence[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """The non-empty `batches`, the first split in two when every one has `batch_size` images, so that at
    least one size differs from it (an export traced at one batch size must run at another)."""
    out = [b for b in batches if len(b)]
    if out and all(len(b) == batch_size for b in out) and len(out[0]) > 1:
        out = split_batches(out[0], [1, len(out[0]) - 1]) + out[1:]
    return out


BUILTIN_IMAGES = Path(__file__).parent.parent / "data" / "calibration"


def builtin_images() -> Path:
    """The built-in calibration set shipped with the package (organism-sized PNGs)."""
    return BUILTIN_IMAGES
