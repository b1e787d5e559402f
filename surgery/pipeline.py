"""The jobs behind the CLI (find, convert, check), as functions for programmatic use and tests."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import __version__
from .bake import bake_registers, register_token_indices, unbake
from .discovery import DiscoveryConfig, DiscoveryResult, find_register_neurons
from .effect import effect_metrics, token_diagnostics
from .errors import ModelInputError, NeuronsFileError, ParityError, SurgeryError
from .images import ImageBatches, list_images
from .loading import LoadedModel, LoadOptions, load_model, torch_dtype
from .organism import builtin_images
from .integrity import assert_finite, record_integrity
from .outputs import atomic_output_dir, check_output_target, refuse_source_overlap
from .parity import FP32_TOLERANCE, ParityReport, check_parity
from .recipe import Recipe, read_neurons_file, validate_recipe_for_model

CHECK_IMAGES = 16  # images used by the parity check unless told otherwise

# Exporters per source library: write the baked model as a drop-in folder for that library.
Exporter = Callable[[torch.nn.Module, Path, LoadedModel, dict[str, Any]], list[Path]]
EXPORTERS: dict[str, Exporter] = {}


def register_exporter(library: str, fn: Exporter) -> None:
    EXPORTERS[library] = fn


def _timm_exporter(model: torch.nn.Module, out: Path, loaded: LoadedModel, surgery: dict[str, Any]) -> list[Path]:
    from exporters.timm_dir import write_timm_dir

    return write_timm_dir(model, out, source=loaded.source, surgery=surgery)


register_exporter("timm", _timm_exporter)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


def run_find(loaded: LoadedModel, images: str | Path, config: DiscoveryConfig, progress: bool = True) -> DiscoveryResult:
    files = list_images(images, config.num_images, config.seed)
    prov = {"model": loaded.spec, "images": str(images), "tool_version": __version__,
            "image_files": [str(Path(f).relative_to(images)) for f in files][:1000]}
    return find_register_neurons(loaded.model, files, config, family=loaded.family, transform=loaded.transform,
                                 progress=progress, provenance=prov)


def resolve_recipe(loaded: LoadedModel, neurons: str, overrides: dict[str, Any]) -> tuple[Recipe, dict[str, Any]]:
    """--neurons: a neurons.json path or the name of a published set; checked against the model."""
    from .published import published_neurons

    path = Path(neurons)
    if path.exists() or neurons.endswith(".json"):
        recipe, doc = read_neurons_file(path)
        source = str(path)
    else:
        recipe, doc = published_neurons(neurons), {"published": neurons}
        source = f"published neurons {neurons!r}"
    blocks = loaded.family.blocks(loaded.model)
    validate_recipe_for_model(recipe, len(blocks), [loaded.family.hidden_size(b) for b in blocks], source)
    prov = doc.get("provenance", {}) if isinstance(doc, dict) else {}
    made_for = prov.get("hidden_sizes"), prov.get("depth")
    have = sorted({loaded.family.hidden_size(b) for b in blocks}), len(blocks)
    if made_for[1] is not None and (made_for[0] != have[0] or made_for[1] != have[1]):
        raise NeuronsFileError(f"{source} was made for a model with {made_for[1]} blocks of MLP width {made_for[0]}, "
                               f"this one has {have[1]} blocks of width {have[0]}")
    return recipe.with_options(**overrides), doc


def parity_batches(loaded: LoadedModel, images: Optional[str | Path], count: int, batch_size: int, seed: int,
                   progress: bool) -> list[torch.Tensor]:
    files = list_images(images or builtin_images(), count, seed)
    it = ImageBatches(files, loaded.transform, batch_size, progress=progress, desc="parity")
    batches = [x for x, _ in it]
    it.require_some(sum(len(b) for b in batches))
    return batches


def measure_effect(source: torch.nn.Module, baked: torch.nn.Module, loaded: LoadedModel, pixels: torch.Tensor,
                   threshold: float | str = "auto") -> dict[str, Any]:
    fam = loaded.family
    p = fam.num_prefix_tokens(source)
    def run(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        ref = next(model.parameters())
        if ref.dtype != torch.float32:  # the effect statistics are measured in float32
            model = copy.deepcopy(model).float()
        return token_diagnostics(model, pixels.to(ref.device, torch.float32), family=fam)

    before = effect_metrics(run(source), p, [], threshold=threshold)
    regs = register_token_indices(baked, fam)
    after = effect_metrics(run(baked), p + len(regs), regs, threshold=threshold)
    return {"before": before, "after": after}


def run_check(baked_loaded: LoadedModel, batches: list[torch.Tensor], *, source: Optional[torch.nn.Module] = None,
              tolerance: float = FP32_TOLERANCE) -> tuple[ParityReport, dict[str, Any]]:
    """Parity of a baked model against the hooked reference on its source (rebuilt by un-baking when
    no source model is given: the split is an exact permutation of the original weights)."""
    baked = baked_loaded.model
    recipe = baked_loaded.recipe
    if recipe is None:
        raise ModelInputError(f"{baked_loaded.spec} carries no baked test-time registers (not a vit-surgery output)")
    if source is None:
        source = copy.deepcopy(baked)
        unbake(source, baked_loaded.family)
    report = check_parity(source, baked, recipe, batches, family=baked_loaded.family, tolerance=tolerance)
    effect = measure_effect(source, baked, baked_loaded, torch.cat(batches)[:32])
    return report, effect


@dataclass
class ConvertResult:
    out: Path
    recipe: Recipe
    report: Optional[ParityReport]
    effect: Optional[dict[str, Any]]
    discovery: Optional[DiscoveryResult]


def run_convert(
    loaded: LoadedModel,
    out: str | Path,
    *,
    neurons: Optional[str] = None,
    images: Optional[str | Path] = None,
    discovery: Optional[DiscoveryConfig] = None,
    overrides: Optional[dict[str, Any]] = None,
    check: bool = True,
    check_images: Optional[str | Path] = None,
    tolerance: float = FP32_TOLERANCE,
    overwrite: bool = False,
    options: Optional[LoadOptions] = None,
    progress: bool = True,
    after_write: Optional[Callable[[Path, LoadedModel], None]] = None,
    dtype: Optional[str] = None,
) -> ConvertResult:
    """find (or read) neurons -> bake -> write to a temporary folder -> reload it through the real
    loader -> parity against the hooked reference -> move into place. Fails leave nothing at OUT."""
    out = Path(out)
    check_output_target(out, overwrite)
    refuse_source_overlap(out, loaded.spec)
    if loaded.recipe is not None:
        raise ModelInputError(f"{loaded.spec} already carries baked test-time registers")
    library = loaded.source.get("library", loaded.family.name)
    if library not in EXPORTERS:
        raise ModelInputError(f"no exporter for {library} models")
    overrides = overrides or {}
    result: Optional[DiscoveryResult] = None
    if neurons:
        recipe, _ = resolve_recipe(loaded, neurons, overrides)
    elif images:
        cfg = discovery or DiscoveryConfig()
        result = run_find(loaded, images, cfg, progress)
        recipe = result.recipe.with_options(**overrides)
    else:
        from .published import published_for_model

        name = published_for_model(loaded)
        if name is None:
            raise SurgeryError(f"convert needs --neurons FILE|NAME or --images DIR: no published register neurons "
                               f"are known for {loaded.spec}")
        recipe, _ = resolve_recipe(loaded, name, overrides)
    baked = bake_registers(copy.deepcopy(loaded.model), recipe, loaded.family)
    # Baked in float32; written in the source checkpoint's dtype unless --dtype says otherwise.
    out_dtype = dtype or loaded.source.get("dtype") or "float32"
    baked.to(torch_dtype(out_dtype))
    assert_finite(baked, "the baked model")
    surgery_doc = {"recipe": recipe.to_dict(), "source_model": loaded.spec, "source": loaded.source,
                   "tool": "vit-surgery", "tool_version": __version__,
                   "token_layout": {"num_prefix_tokens": loaded.family.num_prefix_tokens(loaded.model),
                                    "register_indices": register_token_indices(baked, loaded.family)},
                   "dtype": out_dtype}
    if result is not None:
        surgery_doc["discovery"] = {k: v for k, v in result.to_json().items() if k not in ("layer_norms",)}
    report = effect = None
    with atomic_output_dir(out, overwrite) as tmp:
        EXPORTERS[library](baked, tmp, loaded, surgery_doc)
        if result is not None:
            write_json(tmp / "neurons.json", result.to_json())
        record_integrity(tmp, loaded.spec, loaded.model)
        if check:
            reloaded = load_model(str(tmp), options)
            batches = parity_batches(reloaded, check_images or images, CHECK_IMAGES,
                                     (discovery or DiscoveryConfig()).batch_size, 0, progress)
            report, effect = run_check(reloaded, batches, source=loaded.model, tolerance=tolerance)
            write_json(tmp / "parity.json", {"parity": report.to_dict(), "effect": effect})
            if not report.passed:
                raise ParityError(report.summary() + "; no output written")
        from exporters.model_card import write_model_card

        write_model_card(tmp, library, loaded.model, surgery_doc, report.to_dict() if report else None, effect)
        if after_write is not None:
            after_write(tmp, loaded)
    return ConvertResult(out, recipe, report, effect, result)
