"""Which two models a report compares (the original and the baked side) and where the neuron ranking
comes from."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..core.bake import baked_copy
from ..core.discovery import DiscoveryConfig, find_register_neurons
from ..core.errors import NoOutliersError
from ..core.output_format import NEURONS_FILE, SURGERY_FILE
from ..core.images import list_images
from ..core.source import LoadedModel, LoadOptions
from ..backends import load_model
from ..core.recipe import Recipe

DEFAULT_NUM_IMAGES = 64  # images measured (a seeded sample when the folder has more)


# ---- models -----------------------------------------------------------------------------------

@dataclass
class Pair:
    original: LoadedModel
    baked: Optional[LoadedModel]
    how: str  # how the baked side was obtained
    ranking_doc: Optional[dict[str, Any]] = None
    ranking_source: str = ""  # how the ranking was obtained (appended to ranking_path when that is set)
    ranking_path: str = ""  # the file it was read from
    notes: list[str] = field(default_factory=list)
    original_label: str = ""
    original_suffix: str = ""  # e.g. " (un-baked copy)"
    baked_label: Optional[str] = None  # None: baked in memory


def image_files(images: Any, num_images: Optional[int], seed: int) -> list[Path]:
    if isinstance(images, (str, Path)):
        return list_images(images, num_images, seed)
    files = [Path(p) for p in images]
    if num_images is not None and len(files) > num_images:
        import random

        files = sorted(random.Random(seed).sample(files, num_images))
    return files


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _same_neurons(doc: dict[str, Any], recipe: Recipe) -> bool:
    try:
        return Recipe.from_dict(doc).neurons == recipe.neurons
    except Exception:
        return False


def _find_ranking(folder: Path, recipe: Recipe) -> tuple[Optional[dict[str, Any]], str]:
    """The discovery record that produced the converted folder, if it is around."""
    cands = [(folder / NEURONS_FILE, None), (folder / SURGERY_FILE, "discovery"), (folder.parent / NEURONS_FILE, None)]
    for path, key in cands:
        doc = _read_json(path) if path.is_file() else None
        if doc is not None and key:
            doc = doc.get(key) if isinstance(doc.get(key), dict) else None
        if doc is not None and isinstance(doc.get("scores"), list) and _same_neurons(doc, recipe):
            return doc, str(path), (f' ("{key}")' if key else "")
    return None, "", ""


def _discover(loaded: LoadedModel, files: list[Path], cfg: DiscoveryConfig, progress: bool) -> dict[str, Any]:
    res = find_register_neurons(loaded.model, files, cfg, adapter=loaded.adapter, transform=loaded.transform,
                                progress=progress, provenance={"model": loaded.spec, "images": "report images"})
    return res.to_json()


def resolve_pair(model_spec: str, baked_spec: Optional[str], files: list[Path], *, options: Optional[LoadOptions],
                 neurons: Optional[str], cfg: DiscoveryConfig, progress: bool) -> Pair:
    from .knn_eval import original_and_baked
    from ..pipeline import resolve_recipe

    if baked_spec is not None:
        original, baked = original_and_baked(model_spec, baked_spec, options)
        pair = Pair(original, baked, "converted folder", original_label=model_spec, baked_label=baked_spec)
        folder = Path(baked_spec)
    else:
        first = load_model(model_spec, options)
        if first.recipe is not None:
            original, baked = _unbaked(first)
            pair = Pair(original, baked, "converted folder; the original is its un-baked copy (exact)",
                        original_label=model_spec, original_suffix=" (un-baked copy)", baked_label=model_spec)
            folder = Path(model_spec)
        else:
            folder = None
            if neurons:
                recipe, doc = resolve_recipe(first, neurons, {})
                pair = Pair(first, None, f"baked in memory from {neurons}", original_label=model_spec)
                if isinstance(doc.get("scores"), list):
                    pair.ranking_doc, pair.ranking_path = doc, neurons
            else:
                try:
                    doc = _discover(first, files, cfg, progress)
                except NoOutliersError as e:
                    return Pair(first, None, "not baked", notes=[f"discovery found nothing to fix: {e}"],
                                original_label=model_spec)
                recipe = Recipe.from_dict(doc)
                pair = Pair(first, None, "baked in memory from register neurons found on these images",
                            ranking_doc=doc, ranking_source="discovery on the report images",
                            original_label=model_spec)
            baked = copy.copy(first)
            baked.model = baked_copy(first.model, recipe, adapter=first.adapter)
            baked.recipe = recipe
            pair.baked = baked
    if pair.ranking_doc is None and folder is not None and folder.is_dir():
        pair.ranking_doc, pair.ranking_path, pair.ranking_source = _find_ranking(folder, pair.baked.recipe)
    if pair.ranking_doc is None:
        try:
            pair.ranking_doc = _discover(pair.original, files, cfg, progress)
            pair.ranking_source = "discovery on the report images (no discovery record found with the model)"
            if not _same_neurons(pair.ranking_doc, pair.baked.recipe):
                pair.notes.append("discovery on the report images chose other neurons than the baked model holds; "
                                  "the ranking shows what these images point to")
        except NoOutliersError as e:
            pair.notes.append(f"no neuron ranking: {e}")
    return pair


def _unbaked(first: LoadedModel) -> tuple[LoadedModel, LoadedModel]:
    from .knn_eval import unbaked_original

    return unbaked_original(first, first.spec), first


