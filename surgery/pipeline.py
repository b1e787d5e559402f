"""The jobs behind the CLI (find, convert, check), as functions for programmatic use and tests."""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from . import __version__
from .core.bake import baked_copy, baked_in_place, register_token_indices, unbaked_copy
from .core.cast import cast_blockwise
from .core.discovery import DiscoveryConfig, DiscoveryResult, find_register_neurons
from .core.output_format import PARITY_FILE, write_json
from .core.effect import collected, effect_metrics, last_block_diagnostics
from .core.errors import ModelInputError, NeuronsFileError, ParameterError, ParityError
from .core.images import ImageBatches, list_images
from .core.source import LoadedModel, LoadOptions, torch_dtype
from .backends import load_model, writer_for
from .core.memory import Estimate, activation_bytes, current_rss, module_bytes, require_fits, tokens_for, trim_heap
from .core.images import builtin_images
from .core.integrity import assert_finite, record_integrity
from .core.outputs import atomic_output_dir, check_output_target, refuse_input_overlap
from .core.parity import FP32_TOLERANCE, ParityReport, check_parity
from .core.progress import current, stage
from .core.recipe import Recipe, read_neurons_file, validate_recipe_for_model
from .core.verdict import Verdict, all_passed

CHECK_IMAGES = 16  # images used by the parity check of a ViT-B/16 at 224 px unless told otherwise
MIN_CHECK_IMAGES = 4  # ... and never fewer, however large the model (see default_check_images)
_VITB16_WORK = 86e6 * 197  # parameters x tokens of a ViT-B/16 at 224 px



def run_find(loaded: LoadedModel, images: str | Path, config: DiscoveryConfig, progress: bool = True) -> DiscoveryResult:
    files = list_images(images, config.num_images, config.seed)
    prov = {"model": loaded.spec, "images": str(images), "tool_version": __version__,
            "image_files": [str(Path(f).relative_to(images)) for f in files][:1000]}
    return find_register_neurons(loaded.model, files, config, adapter=loaded.adapter, transform=loaded.transform,
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
    blocks = loaded.adapter.blocks(loaded.model)
    validate_recipe_for_model(recipe, len(blocks), [loaded.adapter.mlp_width(b) for b in blocks], source)
    prov = doc.get("provenance", {}) if isinstance(doc, dict) else {}
    made_for = prov.get("hidden_sizes"), prov.get("depth")
    have = sorted({loaded.adapter.mlp_width(b) for b in blocks}), len(blocks)
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


def default_check_images(loaded: LoadedModel) -> int:
    """How many images convert's parity check uses: the work of 16 ViT-B/16-at-224 images (work =
    parameters x tokens per image), at least MIN_CHECK_IMAGES and at most CHECK_IMAGES. A ViT-B/16 gets
    16, a ViT-L/14 at 518 px 4 (each image still judges every token of every block: 24 x 1370 vectors)."""
    fam = loaded.adapter
    model = loaded.model
    params = sum(p.numel() for p in model.parameters())
    c, h, w = fam.input_size(model)
    try:
        k = fam.patch_embed(model).kernel_size
        tokens = (h // k[0]) * (w // k[1]) + fam.num_prefix_tokens(model)
    except (NotImplementedError, AttributeError):
        return CHECK_IMAGES
    return max(MIN_CHECK_IMAGES, min(CHECK_IMAGES, int(CHECK_IMAGES * _VITB16_WORK / max(1, params * tokens))))


def measure_effect(source: torch.nn.Module, family: Any, batches: list[torch.Tensor],
                   after: dict[str, list[torch.Tensor]], registers: list[int],
                   threshold: float | str = "auto") -> dict[str, Any]:
    """Outliers and attention before (the source, float32, one pass over `batches`) and after (`after`:
    collected by `last_block_diagnostics` during the parity check's pass of the baked model)."""
    fam = family
    p = fam.num_prefix_tokens(source)
    sink: dict[str, list[torch.Tensor]] = {}
    dev = next(source.parameters()).device
    with torch.inference_mode(), cast_blockwise(source, fam.blocks(source), torch.float32), \
            last_block_diagnostics(source, fam, 0, sink):
        for pixels in batches:  # the effect statistics are measured in float32
            fam.forward_effect(source, pixels.to(dev, torch.float32))
    before = effect_metrics(collected(sink), p, [], threshold=threshold)
    return {"before": before, "after": effect_metrics(collected(after), p + len(registers), registers,
                                                      threshold=threshold)}


def run_check(baked_loaded: LoadedModel, batches: list[torch.Tensor], *, source: Optional[torch.nn.Module] = None,
              tolerance: float = FP32_TOLERANCE) -> tuple[ParityReport, dict[str, Any]]:
    """Parity of a baked model against the hooked reference on its source (rebuilt by un-baking when
    no source model is given: the split is an exact permutation of the original weights).

    Three forward passes per batch: the baked model (judged; its effect statistics collected on the
    way), the hooked reference in float64 block by block, the source in float32 (effect before); a
    fourth, perturbed float64 pass only for outputs that need their conditioning measured."""
    baked = baked_loaded.model
    recipe = baked_loaded.recipe
    if recipe is None:
        raise ModelInputError(f"{baked_loaded.spec} carries no baked test-time registers (not a vit-surgery output)")
    fam = baked_loaded.adapter
    if source is None:
        source = unbaked_copy(baked, adapter=fam)
    after: dict[str, list[torch.Tensor]] = {}
    report = check_parity(source, baked, recipe, batches, adapter=fam, tolerance=tolerance,
                          on_baked_batch=lambda m, _x: last_block_diagnostics(m, fam, recipe.num_registers, after))
    effect = measure_effect(source, fam, batches, after, register_token_indices(baked, adapter=fam))
    return report, effect


def _convert_recipe(loaded: LoadedModel, neurons: Optional[str], images: Optional[str | Path],
                    discovery: Optional[DiscoveryConfig], overrides: dict[str, Any],
                    progress: bool) -> tuple[Recipe, Optional[DiscoveryResult]]:
    """The recipe convert bakes: from --neurons, else found on --images (with the discovery result),
    else the published set known for the model."""
    if neurons:
        return resolve_recipe(loaded, neurons, overrides)[0], None
    if images:
        result = run_find(loaded, images, discovery or DiscoveryConfig(), progress)
        return result.recipe.with_options(**overrides), result
    from .published import published_for_model

    name = published_for_model(loaded)
    if name is None:
        raise ParameterError(f"convert needs {{neurons}} (a file or a published name) or {{images}} (a folder): no "
                             f"published register neurons are known for {loaded.spec}", "neurons", "images")
    return resolve_recipe(loaded, name, overrides)[0], None


def _surgery_doc(loaded: LoadedModel, recipe: Recipe, result: Optional[DiscoveryResult], num_prefix: int,
                 register_indices: list[int], out_dtype: str) -> dict[str, Any]:
    """surgery.json: what was baked into the output, from which source, with which token layout."""
    doc = {"recipe": recipe.to_dict(), "source_model": loaded.spec, "source": loaded.source.to_dict(),
           "tool": "vit-surgery", "tool_version": __version__,
           "token_layout": {"num_prefix_tokens": num_prefix, "register_indices": register_indices},
           "dtype": out_dtype}
    if result is not None:
        doc["discovery"] = {k: v for k, v in result.to_json().items() if k not in ("layer_norms",)}
    return doc


@contextlib.contextmanager
def _baked_copy(model: torch.nn.Module, recipe: Recipe, fam: Any, out_dtype: str) -> Iterator[torch.nn.Module]:
    """--dtype other than the model's: a baked copy in that dtype (baked in the model's own dtype first)."""
    yield baked_copy(model, recipe, adapter=fam).to(torch_dtype(out_dtype))


def _verify_not_reloaded(reloaded: LoadedModel, loaded: LoadedModel, out_dtype: str) -> None:
    """The part of an output the check did not rebuild (an open_clip text tower) must be the source's
    tensors bit for bit (in the written dtype): compared one tensor at a time."""
    from .core.weights import differing_tensors, share_with_file

    path, keys = reloaded.extra.get("weights_not_loaded", (None, []))
    if not keys:
        return
    expected = loaded.extra["clip"].state_dict()
    bad = differing_tensors(path, keys, expected)
    if bad:
        raise ParityError(f"{len(bad)} written tensor(s) outside the image tower differ from the source's "
                          f"(first: {bad[0]}); no output written")
    # Equal bit for bit: the source's text tower can live in the page cache (the file) from here on,
    # which is what lets a 10 GB CLIP be checked next to its reloaded image tower on a 24 GB machine.
    share_with_file(loaded.extra["clip"], path, keys)


def convert_estimate(loaded: LoadedModel, out_dtype: str, batch_size: int, num_registers: int,
                     in_place: bool) -> Estimate:
    """convert's peak (surgery/core/memory.py): this process + the reloaded output + one float64 block + one batch."""
    fam, model = loaded.adapter, loaded.model
    whole = loaded.extra.get("clip", model)
    blocks = fam.blocks(model)
    c, h, w = fam.input_size(model)
    try:
        k = fam.patch_embed(model).kernel_size
        tokens = tokens_for((c, h, w), int(k[0]), fam.num_prefix_tokens(model) + num_registers)
        heads = fam.attention(blocks[0]).num_heads
    except (NotImplementedError, AttributeError):
        tokens, heads = (h // 14) * (w // 14) + 1 + num_registers, max(1, fam.embed_dim(model) // 64)
    width = fam.embed_dim(model)
    act = activation_bytes(len(blocks), width, tokens, batch_size, heads, torch_dtype(out_dtype),
                           fam.mlp_width(blocks[0]) / width)
    # an open_clip text tower written unchanged is re-pointed at the written file before the check
    released = module_bytes(whole) - module_bytes(model) if in_place and whole is not model else 0
    return Estimate(now=current_rss() - released, reload=module_bytes(model, torch.float32),  # the check reloads the image model
                    block64=module_bytes(blocks[0], torch.float64) + module_bytes(model, torch.float64) // max(1, len(blocks)),
                    activations=act, copy=0 if in_place else module_bytes(model, torch_dtype(out_dtype)),
                    stream=int(loaded.extra.get("stream_bytes", 0)))


@dataclass
class ConvertResult:
    """What convert did. `report`: the parity report (a ParityReport, or the ONNX rewrite's check report),
    None without a check; `exports`: the validation reports of the formats written next to it;
    `baked_into`: what was rewritten when it is not a PyTorch model (ONNX inputs), for the summary line."""

    out: Path
    recipe: Recipe
    report: Optional[Verdict]
    effect: Optional[dict[str, Any]]
    discovery: Optional[DiscoveryResult]
    exports: list[Verdict] = dataclasses.field(default_factory=list)
    baked_into: str = ""
    written_note: str = ""

    @property
    def passed(self) -> bool:
        return (self.report is None or self.report.passed) and all_passed(self.exports)

    def summary(self) -> str:
        """One line: the first failing verdict's, else the parity report's (or what was written, unchecked)."""
        failing = [v for v in ([self.report] if self.report is not None else []) + self.exports if not v.passed]
        if failing:
            return failing[0].summary()
        return self.report.summary() if self.report is not None else f"wrote {self.out} (not checked)"

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "out": str(self.out), "recipe": self.recipe.to_dict(),
                "parity": self.report.to_dict() if self.report is not None else None,
                "effect": self.effect, "exports": [r.to_dict() for r in self.exports], "summary": self.summary()}

    def summary_lines(self) -> list[str]:
        """The lines `vit-surgery convert` prints (stdout), in order."""
        units = ", ".join(f"{k}: {list(v)}" for k, v in self.recipe.neurons.items())
        lines = [f"baked {self.recipe.num_neurons} register neuron(s) ({units}), R={self.recipe.num_registers}"
                 + (f" into {self.baked_into}" if self.baked_into else "")]
        if self.report is not None:
            lines.append(self.report.summary())
            lines.extend(effect_lines(self.effect))
        lines.extend(r.summary() for r in self.exports)
        lines.append(f"wrote {self.out}{self.written_note}")
        return lines


def effect_lines(effect: Optional[dict[str, Any]]) -> list[str]:
    """The effect statistics (outliers and attention, before -> after) in one line."""
    if not effect:
        return []
    b, f = effect["before"], effect["after"]
    return [f"outlier share of patch tokens: {b['outlier_share']:.2%} -> {f['outlier_share']:.2%}; "
            f"max/median patch norm: {b['max_over_median_patch_norm']:.2f} -> {f['max_over_median_patch_norm']:.2f}; "
            f"CLS attention on top 1% patches: {b['cls_attention_top_patch_mass']:.2%} -> "
            f"{f['cls_attention_top_patch_mass']:.2%} (register: {f['cls_attention_register_mass']:.2%})"]


def warn_remaining_outliers(effect: Optional[dict[str, Any]]) -> None:
    if effect and effect["after"]["outlier_share"] > 0:
        import warnings

        warnings.warn(f"{effect['after']['outlier_share']:.2%} of patch tokens are still outliers after baking; "
                      "other units also create them: see the ranking in neurons.json and try a larger --max-layer "
                      "or --top-k", stacklevel=2)


# ~65 lines: the convert transaction (bake, write, reload, check, move) reads best as one sequence.
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
    refuse_input_overlap(out, {"the source model": loaded.spec, "the images folder": images,
                               "the neurons file": neurons, "the check images folder": check_images})
    if loaded.recipe is not None:
        raise ModelInputError(f"{loaded.spec} already carries baked test-time registers")
    library = loaded.source.library
    write = writer_for(library)
    recipe, result = _convert_recipe(loaded, neurons, images, discovery, overrides or {}, progress)
    # Baked in the source's dtype; written in the source checkpoint's dtype unless --dtype says otherwise.
    out_dtype = dtype or loaded.source.dtype or "float32"
    model, fam = loaded.model, loaded.adapter
    in_place = torch_dtype(out_dtype) == next(model.parameters()).dtype
    parity_count = default_check_images(loaded)
    batch_size = min((discovery or DiscoveryConfig()).batch_size, parity_count)
    if check:
        require_fits(convert_estimate(loaded, out_dtype, batch_size, recipe.num_registers, in_place))
    num_prefix = fam.num_prefix_tokens(model)
    report = effect = None
    with atomic_output_dir(out, overwrite) as tmp:
        # No copy of the model: baked in place, written tensor by tensor, and put back exactly (the
        # original modules are restored) before the output is reloaded next to it for the check.
        with contextlib.ExitStack() as baking:
            with stage("baking"):
                baked = baking.enter_context(baked_in_place(model, recipe, adapter=fam) if in_place
                                             else _baked_copy(model, recipe, fam, out_dtype))
            surgery_doc = _surgery_doc(loaded, recipe, result, num_prefix, register_token_indices(baked, adapter=fam),
                                       out_dtype)
            assert_finite(baked, "the baked model")
            with stage(f"writing {library} weights"):
                write(baked, tmp, loaded, surgery_doc)
            del baked
        trim_heap()  # the split MLPs (or the copy) are gone before the output is reloaded
        if result is not None:
            write_json(tmp / "neurons.json", result.to_json())
        record_integrity(tmp, loaded.spec, loaded.model, loaded.extra.get("source_path_from_output"))
        if check:
            with stage("reloading the output"):
                reloaded = load_model(str(tmp), dataclasses.replace(options or LoadOptions(), convert_check=True))
            _verify_not_reloaded(reloaded, loaded, out_dtype)
            batches = parity_batches(reloaded, check_images or images, parity_count, batch_size, 0, progress)
            report, effect = run_check(reloaded, batches, source=model, tolerance=tolerance)
            del reloaded
            write_json(tmp / PARITY_FILE, {"parity": report.to_dict(), "effect": effect})
            if not report.passed:
                raise ParityError(report.summary() + "; no output written")
        from surgery.exporters.model_card import write_model_card

        write_model_card(tmp, library, loaded.model, surgery_doc, report.to_dict() if report else None, effect)
        if after_write is not None:
            after_write(tmp, loaded)
    return ConvertResult(out, recipe, report, effect, result)


def export_formats_hook(formats: Sequence[str], *, fp16: bool = False, progress: bool = True,
                        options: Optional[LoadOptions] = None,
                        reports: Optional[list[Verdict]] = None) -> Optional[Callable[[Path, LoadedModel], None]]:
    """`run_convert`'s after_write for `convert --formats` / `surgery.convert(formats=...)`: each named
    format of the registry (exporters/formats.py) exported from the temporary output and validated
    before the output is moved into place. None for no formats; an unknown name fails before any work.
    With `reports`, the validation reports are appended there instead of printed."""
    if not formats:
        return None
    from surgery.exporters.base import ExportOptions
    from surgery.exporters.formats import format_named

    chosen = [format_named(n) for n in dict.fromkeys(formats)]
    for fmt in chosen:
        if fp16 and not fmt.supports_fp16:
            raise ParameterError(f"{{fp16}} does not apply to the {fmt.name} format (full precision only)", "fp16")

    def after(tmp: Path, _loaded: LoadedModel) -> None:
        from .backends import load_model

        reloaded = load_model(str(tmp), options or LoadOptions())
        for fmt in chosen:
            with stage(f"{fmt.name} export"):
                report = fmt.export(tmp, reloaded, ExportOptions(fp16=fp16, progress=progress and current().prints))
            if reports is not None:  # the caller shows them
                reports.append(report)
            elif progress:
                print(f"vit-surgery: {report.summary()}", file=sys.stderr)
    return after
