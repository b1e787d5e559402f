"""The surgery recipe: which MLP units are register neurons and how the test-time register behaves.

This is the one canonical description shared by discovery, the hooked reference, baking, exporters
and the neurons-file format: `{"register_neurons": {"<block index>": [unit, ...]}, ...}`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import NeuronsFileError

# Register rows get scale x signed max: beyond this the register token overflows float32 for ordinary
# activations (and the result would be blamed on the source), so it is refused up front.
MAX_SCALE = 1e6

MODES = ("shared", "per_neuron")


@dataclass(frozen=True)
class Recipe:
    """Register neurons per block plus the intervention's knobs.

    neurons: block index -> sorted unique hidden-unit indices (post-activation units of that block's MLP).
    num_registers: R zero tokens added before the pre-norm.
    scale: register rows get `scale * signed_max`.
    mode: "shared" = one signed max per image per block (reference); "per_neuron" = one per unit.
    """

    neurons: Mapping[int, tuple[int, ...]]
    num_registers: int = 1
    scale: float = 1.0
    mode: str = "shared"

    def __post_init__(self) -> None:
        clean = {int(k): tuple(sorted(set(int(u) for u in v))) for k, v in self.neurons.items() if len(v)}
        object.__setattr__(self, "neurons", dict(sorted(clean.items())))
        if self.num_registers < 1:
            raise NeuronsFileError(f"num_registers must be >= 1, got {self.num_registers}")
        if not math.isfinite(self.scale) or abs(self.scale) > MAX_SCALE:
            raise NeuronsFileError(f"scale must be a finite number with |scale| <= {MAX_SCALE:g}, got {self.scale}")
        if self.mode not in MODES:
            raise NeuronsFileError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.neurons:
            raise NeuronsFileError("the recipe names no register neurons")

    @property
    def num_neurons(self) -> int:
        return sum(len(v) for v in self.neurons.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "register_neurons": {str(k): list(v) for k, v in self.neurons.items()},
            "num_registers": self.num_registers,
            "scale": self.scale,
            "mode": self.mode,
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "neurons file") -> "Recipe":
        """Parse and validate the neurons-file structure; every defect is a one-line NeuronsFileError."""
        if not isinstance(data, dict):
            raise NeuronsFileError(f"{source}: expected a JSON object, got {type(data).__name__}")
        raw = data.get("register_neurons")
        if not isinstance(raw, dict):
            raise NeuronsFileError(f"{source}: missing object 'register_neurons' ({{\"<block>\": [unit, ...]}})")
        neurons: dict[int, list[int]] = {}
        for key, units in raw.items():
            if not isinstance(key, str) or not key.strip().isdigit() or not key.strip().isascii():
                raise NeuronsFileError(f"{source}: block key {key!r} is not a non-negative integer")
            if not isinstance(units, list) or not units:
                raise NeuronsFileError(f"{source}: block {key} must map to a non-empty list of unit indices")
            for u in units:
                if isinstance(u, bool) or not isinstance(u, int) or u < 0:
                    raise NeuronsFileError(f"{source}: block {key} has invalid unit {u!r} (need integers >= 0)")
            block = int(key)
            if block in neurons:
                raise NeuronsFileError(f"{source}: block {block} is listed twice")
            if len(set(units)) != len(units):
                raise NeuronsFileError(f"{source}: block {key} lists a unit twice")
            neurons[block] = units
        if not neurons:
            raise NeuronsFileError(f"{source}: 'register_neurons' is empty")
        num_registers = data.get("num_registers", 1)
        scale = data.get("scale", 1.0)
        mode = data.get("mode", "shared")
        if isinstance(num_registers, bool) or not isinstance(num_registers, int) or not 1 <= num_registers <= 64:
            raise NeuronsFileError(f"{source}: num_registers must be an integer in [1, 64], got {num_registers!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or abs(scale) > MAX_SCALE:
            raise NeuronsFileError(f"{source}: scale must be a finite number with |scale| <= {MAX_SCALE:g}, "
                                   f"got {scale!r}")
        if mode not in MODES:
            raise NeuronsFileError(f"{source}: mode must be one of {list(MODES)}, got {mode!r}")
        return cls(neurons=neurons, num_registers=num_registers, scale=float(scale), mode=mode)

    def with_options(self, **changes: Any) -> "Recipe":
        d = {"neurons": self.neurons, "num_registers": self.num_registers, "scale": self.scale, "mode": self.mode}
        d.update({k: v for k, v in changes.items() if v is not None})
        return Recipe(**d)


class _DuplicateKey(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def read_neurons_file(path: str | Path) -> tuple[Recipe, dict[str, Any]]:
    """Read a neurons JSON file. Returns the recipe and the whole document (for provenance checks)."""
    p = Path(path)
    if not p.is_file():
        raise NeuronsFileError(f"neurons file not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"), object_pairs_hook=_object_without_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NeuronsFileError(f"neurons file {p} is not valid JSON: {e}") from None
    except _DuplicateKey as e:
        raise NeuronsFileError(f"neurons file {p}: key {e.args[0]!r} appears twice in one object "
                               "(JSON readers would silently keep only one)") from None
    except RecursionError:
        raise NeuronsFileError(f"neurons file {p} is nested too deeply to be a neurons file") from None
    return Recipe.from_dict(data, source=str(p)), data


def validate_recipe_for_model(recipe: Recipe, depth: int, hidden_sizes: list[int], source: str = "neurons") -> None:
    """A recipe must name existing blocks and units inside each block's MLP hidden width."""
    for block, units in recipe.neurons.items():
        if block >= depth:
            raise NeuronsFileError(f"{source}: block {block} does not exist (model has {depth} blocks, 0..{depth - 1})")
        width = hidden_sizes[block]
        bad = [u for u in units if u >= width]
        if bad:
            raise NeuronsFileError(
                f"{source}: block {block} unit {bad[0]} is out of range (MLP hidden width is {width}); "
                "was this file made for another model?"
            )

