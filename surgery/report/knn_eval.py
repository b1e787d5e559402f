"""k-NN evaluation: does the baked model keep the original's function?

Both models embed the same images (one decode, one transform, two forward passes per batch) with
their pooled output (`Family.forward_pooled`: the CLIP image embedding, a classifier's logits, ...).
A cosine k-nearest-neighbour classifier, fitted on a gallery split and scored on a query split,
gives top-1 accuracy before and after. The paper reports zero-shot accuracy within 0.05 points;
this is the label-free stand-in any user can run on a folder of labelled images.

Dataset layout (torchvision ImageFolder): DIR/CLASS/IMAGE. If DIR holds `train/` and `val/` (or
`test/`) folders that are each in that layout, they are the gallery and query sets; otherwise each
class is split with a seeded shuffle (`test_fraction` of its images, at least one, become queries).
Hidden folders and files are ignored; unreadable images are skipped with a warning.
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..core.errors import ImageInputError, ModelInputError, ParameterError
from ..core.adapter import Adapter
from ..core.images import IMAGE_EXTENSIONS, ImageBatches

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07  # similarity-weighted vote, exp(sim / T) (as in DINO's k-NN protocol)
SPLIT_NAMES = (("train", "val"), ("train", "test"))


@dataclass
class Split:
    classes: list[str]
    gallery: list[tuple[Path, int]]
    query: list[tuple[Path, int]]
    rule: str


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _image_folder(root: Path, what: str) -> dict[str, list[Path]]:
    """class name -> sorted image files; one-line ImageInputError for every layout defect."""
    if not root.exists():
        raise ImageInputError(f"{what} not found: {root}")
    if not root.is_dir():
        raise ImageInputError(f"{what} is not a folder: {root}")
    dirs = _visible_dirs(root)
    if not dirs:
        loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        hint = f" (found {len(loose)} image(s) directly in it)" if loose else ""
        raise ImageInputError(f"{what} {root} has no class folders{hint}: expected the ImageFolder layout "
                              "DIR/CLASS/IMAGE with at least two classes")
    classes = {d.name: _class_images(d) for d in dirs}
    empty = [c for c, files in classes.items() if not files]
    if empty:
        raise ImageInputError(f"{what} {root}: class folder {empty[0]!r} has no image files "
                              f"({', '.join(sorted(IMAGE_EXTENSIONS))})"
                              + (f" (and {len(empty) - 1} more empty)" if len(empty) > 1 else ""))
    if len(classes) < 2:
        raise ImageInputError(f"{what} {root} has only one class folder ({dirs[0].name!r}); "
                              "k-NN accuracy needs at least two classes")
    return classes


def _cap(files: list[Path], cap: Optional[int], rng: random.Random) -> list[Path]:
    if cap is not None and len(files) > cap:
        return sorted(rng.sample(files, cap))
    return files


def dataset_split(root: str | Path, test_fraction: float = 0.2, seed: int = 0,
                  max_per_class: Optional[int] = None) -> Split:
    """Gallery/query split of an ImageFolder dataset; the same arguments always give the same split."""
    root = Path(root)
    if not 0.0 < test_fraction < 1.0:
        raise ParameterError(f"{{test_fraction}} must be between 0 and 1 (exclusive), got {test_fraction}", "test_fraction")
    if root.is_dir():
        names = {d.name for d in _visible_dirs(root)}
        for tr, te in SPLIT_NAMES:
            if tr in names and te in names and names <= {tr, te, "test", "val"}:
                train, test = _image_folder(root / tr, "gallery folder"), _image_folder(root / te, "query folder")
                unknown = sorted(set(test) - set(train))
                if unknown:
                    raise ImageInputError(f"query class {unknown[0]!r} in {root / te} has no folder in {root / tr}")
                classes = sorted(train)
                idx = {c: i for i, c in enumerate(classes)}
                rng = random.Random(seed)
                gallery = [(f, idx[c]) for c in classes for f in _cap(train[c], max_per_class, rng)]
                query = [(f, idx[c]) for c in sorted(test) for f in _cap(test[c], max_per_class, rng)]
                return Split(classes, gallery, query, f"predefined split: {tr}/ is the gallery, {te}/ the queries")
    per_class = _image_folder(root, "dataset folder")
    classes = sorted(per_class)
    small = [c for c in classes if len(per_class[c]) < 2]
    if small:
        raise ImageInputError(f"dataset folder {root}: class {small[0]!r} has {len(per_class[small[0]])} image; "
                              "each class needs at least 2 (one for the gallery, one as a query)")
    rng = random.Random(seed)
    gallery, query = [], []
    for i, c in enumerate(classes):
        files = _cap(per_class[c], max_per_class, rng)
        order = list(files)
        rng.shuffle(order)
        n_query = min(len(order) - 1, max(1, int(round(test_fraction * len(order)))))
        query += [(f, i) for f in sorted(order[:n_query])]
        gallery += [(f, i) for f in sorted(order[n_query:])]
    return Split(classes, gallery, query,
                 f"seeded split (seed {seed}): {test_fraction:g} of each class's images are queries")


@torch.inference_mode()
def extract_features(models: list[nn.Module], family: Adapter, transform: Any, items: list[tuple[Path, int]],
                     batch_size: int = 32, progress: bool = True, desc: str = "features"
                     ) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Pooled features of every model on the same pixels: ([N, E] per model, labels [N], skipped count)."""
    label_of = {str(p): y for p, y in items}
    device = next(models[0].parameters()).device
    dtype = next(models[0].parameters()).dtype
    feats: list[list[torch.Tensor]] = [[] for _ in models]
    labels: list[int] = []
    batches = ImageBatches([p for p, _ in items], transform, batch_size, progress=progress, desc=desc)
    for pixels, paths in batches:
        x = pixels.to(device=device, dtype=dtype)
        for i, m in enumerate(models):
            feats[i].append(family.forward_pooled(m, x).float().cpu())
        labels += [label_of[str(p)] for p in paths]
    batches.require_some(len(labels))
    return [torch.cat(f) for f in feats], torch.tensor(labels, dtype=torch.long), len(batches.skipped)


def knn_predict(gallery: torch.Tensor, gallery_labels: torch.Tensor, query: torch.Tensor, k: int,
                num_classes: int, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """Cosine k-NN with a similarity-weighted vote; ties go to the lower class index (deterministic)."""
    g = torch.nn.functional.normalize(gallery.double(), dim=1)
    q = torch.nn.functional.normalize(query.double(), dim=1)
    k = min(k, g.shape[0])
    preds = []
    for start in range(0, q.shape[0], 1024):
        sim = q[start:start + 1024] @ g.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, dtype=torch.float64)
        votes.scatter_add_(1, gallery_labels[idx], (top / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


@dataclass
class KnnResult:
    dataset: str
    split_rule: str
    classes: list[str]
    gallery_images: int
    query_images: int
    skipped_images: int
    k: int
    temperature: float
    top1_original: float
    top1_baked: float
    prediction_agreement: float
    feature_cosine_mean: float
    feature_cosine_min: float
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def delta_points(self) -> float:
        return 100.0 * (self.top1_baked - self.top1_original)

    def summary(self) -> str:
        return (f"k-NN top-1 (k={self.k}, cosine, {self.gallery_images} gallery / {self.query_images} query images, "
                f"{len(self.classes)} classes): original {self.top1_original:.2%}, baked {self.top1_baked:.2%} "
                f"({self.delta_points:+.2f} points); predictions agree on {self.prediction_agreement:.2%}; "
                f"pooled-feature cosine similarity mean {self.feature_cosine_mean:.6f} (min {self.feature_cosine_min:.6f})")

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "split": self.split_rule, "classes": self.classes,
                "gallery_images": self.gallery_images, "query_images": self.query_images,
                "skipped_images": self.skipped_images, "k": self.k, "temperature": self.temperature,
                "metric": "cosine similarity, similarity-weighted vote exp(sim / temperature)",
                "features": "the model's pooled output (Family.forward_pooled)",
                "top1_original": self.top1_original, "top1_baked": self.top1_baked,
                "delta_points": self.delta_points, "prediction_agreement": self.prediction_agreement,
                "feature_cosine_mean": self.feature_cosine_mean, "feature_cosine_min": self.feature_cosine_min,
                "per_class": self.per_class}


def knn_compare(original: nn.Module, baked: nn.Module, family: Adapter, transform: Any, dataset: str | Path, *,
                k: int = DEFAULT_K, test_fraction: float = 0.2, seed: int = 0, max_per_class: Optional[int] = None,
                batch_size: int = 32, temperature: float = DEFAULT_TEMPERATURE, progress: bool = True) -> KnnResult:
    """k-NN top-1 of `original` and `baked` on the same deterministic split of `dataset`."""
    if k < 1:
        raise ParameterError(f"{{k}} must be >= 1, got {k}", "k")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ParameterError(f"{{temperature}} must be a positive number, got {temperature}", "temperature")
    split = dataset_split(dataset, test_fraction, seed, max_per_class)
    models = [original, baked]
    was = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        (g_o, g_b), g_y, skip_g = extract_features(models, family, transform, split.gallery, batch_size, progress,
                                                   "gallery")
        (q_o, q_b), q_y, skip_q = extract_features(models, family, transform, split.query, batch_size, progress,
                                                   "queries")
    finally:
        for m, w in zip(models, was):
            m.train(w)
    n_cls = len(split.classes)
    p_o = knn_predict(g_o, g_y, q_o, k, n_cls, temperature)
    p_b = knn_predict(g_b, g_y, q_b, k, n_cls, temperature)
    cos = torch.nn.functional.cosine_similarity(torch.cat([g_o, q_o]).double(), torch.cat([g_b, q_b]).double(), dim=1)
    per_class = {}
    for i, c in enumerate(split.classes):
        sel = q_y == i
        if sel.any():
            per_class[c] = {"queries": int(sel.sum()), "top1_original": float((p_o[sel] == i).double().mean()),
                            "top1_baked": float((p_b[sel] == i).double().mean())}
    return KnnResult(
        dataset=str(dataset), split_rule=split.rule, classes=split.classes,
        gallery_images=int(g_y.numel()), query_images=int(q_y.numel()), skipped_images=skip_g + skip_q,
        k=min(k, int(g_y.numel())), temperature=temperature,
        top1_original=float((p_o == q_y).double().mean()), top1_baked=float((p_b == q_y).double().mean()),
        prediction_agreement=float((p_o == p_b).double().mean()),
        feature_cosine_mean=float(cos.mean()), feature_cosine_min=float(cos.min()), per_class=per_class)


def unbaked_original(baked: Any, spec: str) -> Any:
    """The loaded baked model's source: the same LoadedModel with an un-baked copy of its model
    (`baked` is untouched), labelled `spec (un-baked)`."""
    from ..core.bake import unbaked_copy

    original = copy.copy(baked)
    original.model = unbaked_copy(baked.model, adapter=baked.adapter)
    original.recipe = None
    original.spec = f"{spec} (un-baked)"
    return original


def original_and_baked(model_spec: str, baked_spec: Optional[str], options: Any = None) -> tuple[Any, Any]:
    """(original LoadedModel, baked LoadedModel). One converted folder suffices: the original is its
    un-baked copy (exact: the split is a permutation of the original weights)."""
    from ..backends import load_model

    first = load_model(model_spec, options)
    if baked_spec is None:
        if first.recipe is None:
            raise ModelInputError(f"{model_spec} carries no baked test-time registers: give the original model "
                                  "and the converted folder (MODEL OUT), or a converted folder alone")
        return unbaked_original(first, model_spec), first
    baked = load_model(baked_spec, options)
    if first.recipe is not None:
        raise ModelInputError(f"{model_spec} already carries baked test-time registers; give the original model first")
    if baked.recipe is None:
        raise ModelInputError(f"{baked_spec} carries no baked test-time registers (not a vit-surgery output)")
    if type(first.adapter) is not type(baked.adapter):
        raise ModelInputError(f"{model_spec} ({first.adapter.name}) and {baked_spec} ({baked.adapter.name}) "
                              "are different model families")
    return first, baked


def run_eval(model_spec: str, baked_spec: Optional[str], dataset: str | Path, *, options: Any = None,
             **kwargs: Any) -> KnnResult:
    """`vit-surgery eval MODEL [OUT] --dataset DIR` as a function."""
    original, baked = original_and_baked(model_spec, baked_spec, options)
    return knn_compare(original.model, baked.model, original.adapter, original.transform, dataset, **kwargs)
