"""Parity: does a baked model compute what the hooked reference computes on the source model?"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .errors import ParityError
from .adapter import Adapter
from .cast import COMPUTE_DTYPE_ATTR, cast_blockwise
from .judge import (KERNEL_FACTOR, allowed_error, float32_sized_noise, kernel_allowance, max_abs_difference,
                    per_vector_relative)
from .output_format import FP32_TOLERANCE
from .progress import stage
from .recipe import Recipe
from .verdict import verdict_word

JUDGE = ("each vector against the hooked reference run in float64; allowed = max(tolerance x max(1, "
         "conditioning / median conditioning), 4 x the hooked reference's own error in the model's dtype on "
         "this machine, floored at its 99th percentile); conditioning measured on the float64 run under "
         "seeded float32-sized noise")


@dataclass
class OutputError:
    """Worst error of one named output.

    relative: max over feature vectors (each token of each image, or each pooled vector) of
    ||got - reference|| / ||reference||, so a huge register token cannot hide errors elsewhere.
    max_abs: largest elementwise |got - reference|. where: (image, token) of the worst vector.
    When each vector has its own allowed error (the judge, surgery/core/judge.py), `ratio` is the largest
    error / allowed over vectors (> 1 fails), `where` and `allowed` refer to that vector.
    """

    name: str
    max_abs: float = 0.0
    relative: float = 0.0
    where: tuple[int, ...] = ()
    ratio: float | None = None
    allowed: float | None = None
    relative_at_where: float = 0.0
    allowed_at_largest: float | None = None  # the allowance of the vector with the largest relative error
    # The hooked reference's own error in the model's dtype (measured only where some vector exceeded the
    # plain tolerance): at `where`, and its largest over the output; `allowed_by` says which term of the
    # judge gave the allowance at `where`: "tolerance", "conditioning" or "kernels".
    own_at_where: float | None = None
    own_max: float | None = None
    allowed_by: str | None = None

    def update(self, got: torch.Tensor, ref: torch.Tensor, offset: int = 0,
               allowed: torch.Tensor | None = None, kernel: torch.Tensor | None = None,
               own: torch.Tensor | None = None, tolerance: float | None = None) -> None:
        """Fold one batch in. `allowed`: per-vector allowance; `kernel`, `own`: the kernel term of it and
        the hooked reference's own error it came from (judge.kernel_allowance), when measured."""
        if got.shape != ref.shape:
            raise ParityError(f"{self.name}: the output has shape {tuple(got.shape)}, the reference "
                              f"{tuple(ref.shape)}: the baked model is not the source's architecture")
        if not ref.numel():
            return
        self.max_abs = max(self.max_abs, max_abs_difference(got, ref))
        rel = per_vector_relative(got, ref)
        score = rel if allowed is None else rel / allowed.to(rel)
        best = float(score.max())
        idx = torch.unravel_index(score.argmax(), score.shape)
        current = self.relative if allowed is None else (self.ratio or 0.0)
        if best >= current or not self.where:
            self.where = (int(idx[0]) + offset,) + tuple(int(i) for i in idx[1:])
            self.relative_at_where = float(rel[idx])
            if allowed is not None:
                self.ratio, self.allowed = best, float(allowed[idx])
                self.own_at_where = float(own[idx]) if own is not None else None
                self.allowed_by = _allowed_by(self.allowed, kernel, idx, rel, tolerance)
        if own is not None:
            self.own_max = max(self.own_max or 0.0, float(own.max()))
        largest = float(rel.max())
        if allowed is not None and (largest >= self.relative or self.allowed_at_largest is None):
            self.allowed_at_largest = float(allowed.to(rel).expand_as(rel).reshape(-1)[rel.argmax()])
        self.relative = max(self.relative, largest)

    def why_allowed(self, tolerance: float, dtype: str = "float32") -> str:
        """Why the worst vector's allowance exceeds `tolerance`, in words ('' when it does not)."""
        if self.allowed is None or self.allowed <= tolerance * (1 + 1e-9):
            return ""
        if self.allowed_by == "kernels":
            return (f"{KERNEL_FACTOR:g} x the error the hooked reference itself makes in {dtype} on this "
                    f"machine there ({self.allowed / KERNEL_FACTOR:.3g})")
        return f"an ill-conditioned vector: float32-sized noise moves it {self.allowed / tolerance:.3g} x the median vector"

    def within(self, tolerance: float) -> bool:
        """Whether the worst vector is inside its allowance (or `tolerance` when none was measured)."""
        return self.ratio <= 1.0 if self.ratio is not None else self.relative <= tolerance

    def excess(self, tolerance: float) -> float:
        """How far out of its allowance the worst vector is (<= 1 passes)."""
        return self.ratio if self.ratio is not None else self.relative / tolerance

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "max_abs": self.max_abs, "relative": self.relative, "where": list(self.where)}
        if self.ratio is not None:
            d.update(error_over_allowed=self.ratio, allowed_at_where=self.allowed,
                     relative_at_where=self.relative_at_where, allowed_at_largest=self.allowed_at_largest,
                     allowed_by=self.allowed_by)
        if self.own_max is not None:
            d.update(reference_own_error_at_where=self.own_at_where, reference_own_error_max=self.own_max)
        return d


def _allowed_by(allowed: float, kernel: torch.Tensor | None, idx: tuple, rel: torch.Tensor,
                tolerance: float | None) -> str:
    if tolerance is not None and allowed <= tolerance * (1 + 1e-12):
        return "tolerance"
    if kernel is not None and float(kernel.to(rel).expand_as(rel)[idx]) >= allowed * (1 - 1e-12):
        return "kernels"
    return "conditioning"


@dataclass
class ParityReport:
    tolerance: float
    outputs: dict[str, OutputError] = field(default_factory=dict)
    images: int = 0
    judge: str = JUDGE
    dtype: str = "float32"  # the baked model's: the dtype whose kernels the hooked reference ran in too

    @property
    def worst(self) -> OutputError:
        return max(self.outputs.values(), key=lambda e: e.excess(self.tolerance))

    @property
    def passed(self) -> bool:
        return all(e.within(self.tolerance) for e in self.outputs.values())

    def failures(self) -> list[OutputError]:
        """Outputs out of tolerance, in forward order (block residuals, tokens, pooled)."""
        return [e for e in self.outputs.values() if not e.within(self.tolerance)]

    @property
    def reference_own_error(self) -> float | None:
        """The largest error of the hooked reference itself in the model's dtype against float64, over
        the outputs where it was measured (those with a vector above the plain tolerance)."""
        measured = [e.own_max for e in self.outputs.values() if e.own_max is not None]
        return max(measured) if measured else None

    def summary(self) -> str:
        w = self.worst
        verdict = verdict_word(self.passed)
        where = f" at (image, token) {tuple(w.where)}" if w.where else ""
        why = w.why_allowed(self.tolerance, self.dtype)
        allowed = f", allowed there {w.allowed:.3g}: {why}" if why else ""
        first = f"; first out of tolerance: {self.failures()[0].name}" if not self.passed else ""
        big = max(self.outputs.values(), key=lambda e: e.relative)
        # a vector above the plain tolerance passes only within its own allowance: say it
        big_allowed = (f" in {big.name}, allowed there {big.allowed_at_largest:.3g}"
                       if big.relative > self.tolerance and big.allowed_at_largest is not None else "")
        line = (f"parity {verdict}: worst relative error vs the float64 reference {w.relative_at_where:.3g} "
                f"(tolerance {self.tolerance:g}{allowed}) in {w.name}{where}, largest anywhere {big.relative:.3g}"
                f"{big_allowed}, over {self.images} image(s){first}")
        if self.passed:
            return line
        own = self.reference_own_error
        said = (f"; the hooked reference itself in {self.dtype} is off by {w.own_at_where:.3g} there "
                f"({own:.3g} at most)" if w.own_at_where is not None and own is not None else "")
        return (f"{line}{said}; a wrong bake is usually off by far more: if you trust it anyway, "
                f"--tolerance {round_up_tolerance(big.relative)} accepts it")

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "tolerance": self.tolerance, "images": self.images,
                "relative_error_definition": "per feature vector ||baked - reference|| / ||reference||",
                "judge": self.judge, "dtype": self.dtype,
                "reference_own_error": self.reference_own_error,
                "worst": self.worst.to_dict(),
                "outputs": [e.to_dict() for e in self.outputs.values()], "summary": self.summary()}


def round_up_tolerance(x: float) -> str:
    """`x` rounded up to 1, 2 or 5 x a power of ten, as a --tolerance value."""
    import math

    if not math.isfinite(x) or x <= 0:
        return "1e-4"
    exp = math.floor(math.log10(x))
    for m in (1, 2, 5, 10):
        if m * 10.0 ** exp >= x * (1 - 1e-9):
            return f"{m * 10.0 ** exp:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{x:.1e}"


def _capture(model: nn.Module, fam: Adapter, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    res: list[torch.Tensor] = []
    hs = [b.register_forward_hook(lambda _m, _a, o: res.append(fam.block_output(o)))
          for b in fam.blocks(model)]
    try:
        pooled, tokens = fam.forward_both(model, pixels)
    finally:
        for h in hs:
            h.remove()
    # forward order, so the first failing output is where the divergence starts
    out = {f"block{i}.residual": r for i, r in enumerate(res)}
    names = output_names(fam)
    out.update({names[0]: tokens, names[1]: pooled})
    return out


def require_same_architecture(source: nn.Module, baked: nn.Module, recipe: Recipe, fam: Adapter) -> None:
    """A source that is not the baked model's own (other depth, widths, prefix tokens or library) is a
    user error, named in one line, before anything runs."""
    if not fam.matches(source):
        raise ParityError(f"the source is a {type(source).__name__} model, the baked model a {fam.name} one: "
                          "not the source it was made from")
    sb, bb = fam.blocks(source), fam.blocks(baked)
    have = (len(sb), [fam.mlp_width(b) for b in sb], fam.embed_dim(source), fam.num_prefix_tokens(source))
    want = (len(bb), [fam.mlp_width(b) for b in bb], fam.embed_dim(baked),
            fam.num_prefix_tokens(baked) - (recipe.num_registers if getattr(baked, "surgery_recipe", None) else 0))
    for what, a, b in zip(("blocks", "MLP widths", "width", "prefix tokens"), have, want):
        if a != b:
            shown = (sorted(set(a)), sorted(set(b))) if isinstance(a, list) else (a, b)
            raise ParityError(f"the source has {what} {shown[0]}, the baked model {shown[1]}: "
                              "not the source it was made from")


Emit = Callable[[str, torch.Tensor], None]


def output_names(fam: Adapter) -> tuple[str, str]:
    """Names of forward_both's (second, first) outputs in reports: ("tokens", "pooled"), or what the
    adapter says (a VLM's are the projector's input features and the language model's logits)."""
    return tuple(getattr(fam, "output_names", ("tokens", "pooled")))  # type: ignore[return-value]


def _stream(model: nn.Module, fam: Adapter, pixels: torch.Tensor, emit: Emit) -> None:
    """One forward pass; `emit(name, output)` for each block's residual the moment the block ends, then
    for the final tokens and the pooled output (forward order, the names `_capture` uses)."""
    count = [0]

    def hook(_m: nn.Module, _a: tuple, o: object) -> None:
        emit(f"block{count[0]}.residual", fam.block_output(o))
        count[0] += 1

    hs = [b.register_forward_hook(hook) for b in fam.blocks(model)]
    try:
        pooled, tokens = fam.forward_both(model, pixels)
    finally:
        for h in hs:
            h.remove()
    names = output_names(fam)
    emit(names[0], tokens)
    emit(names[1], pooled)


@dataclass
class _Pending:
    """An output with some vector above the plain tolerance, waiting for its allowance runs."""

    got: torch.Tensor
    exact: torch.Tensor
    rel: torch.Tensor  # per-vector relative error of `got` against `exact`
    kernel: torch.Tensor | None = None  # kernel_allowance of `own`
    own: torch.Tensor | None = None  # the hooked reference's own error in the model's dtype, per vector
    conditioned: torch.Tensor | None = None  # allowed_error of the conditioning run


class _BatchJudge:
    """One batch, streamed: the baked model's outputs (and, for half models, the hooked reference's own
    outputs in that dtype) are held; the float64 reference then runs block by block and each of its
    outputs is judged and dropped the moment it is computed. The allowance runs (the perturbed float64
    run for the conditioning, the hooked reference in the model's dtype for the kernels' own error) are
    made only for the outputs where some vector is off by more than the plain tolerance: vectors within
    it pass whatever their allowance, so the verdict is that of the full judge."""

    def __init__(self, report: ParityReport, got: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                 tolerance: float) -> None:
        self.report, self.got, self.own, self.tol = report, got, own, tolerance
        self.pending: dict[str, _Pending] = {}

    def exact(self, name: str, exact: torch.Tensor) -> None:
        if not torch.isfinite(exact).all():
            raise ParityError(f"the hooked reference itself gives NaN/Inf in {name} on these images: the "
                              "source model is not usable as it is")
        if name not in self.got:
            raise ParityError(f"the baked model has no output {name!r} (the source has more blocks): it is not "
                              "the source's architecture")
        got = self.got.pop(name)
        if got.shape != exact.shape:
            OutputError(name).update(got, exact)  # raises the one-line shape error
        self.report.outputs.setdefault(name, OutputError(name))  # forward order, whenever it is judged
        rel = per_vector_relative(got, exact)
        own = per_vector_relative(self.own.pop(name), exact) if name in self.own else None
        kernel = kernel_allowance(own) if own is not None else None
        plain = torch.full_like(rel, self.tol) if kernel is None else torch.maximum(torch.full_like(rel, self.tol), kernel)
        if bool((rel <= plain).all()):
            self._update(name, got, exact, plain, kernel, own)
        else:  # judged once the allowance runs have measured these vectors
            self.pending[name] = _Pending(got, exact, rel, kernel, own)

    def conditioning(self, name: str, noisy: torch.Tensor) -> None:
        if name in self.pending:
            p = self.pending[name]
            p.conditioned = allowed_error(per_vector_relative(noisy, p.exact), self.tol)

    def own_error(self, name: str, own: torch.Tensor) -> None:
        if name in self.pending:
            p = self.pending[name]
            p.own = per_vector_relative(own, p.exact)
            p.kernel = kernel_allowance(p.own)

    def settle(self) -> None:
        """Judge now the pending outputs whose every vector is within max(tolerance, kernel allowance): the
        conditioning term can only raise an allowance, so their verdict cannot change."""
        for name in list(self.pending):
            p = self.pending[name]
            if p.kernel is None:
                continue
            plain = torch.maximum(torch.full_like(p.kernel, self.tol), p.kernel)
            if bool((p.rel <= plain).all()):
                self._update(name, p.got, p.exact, plain, p.kernel, p.own)
                del self.pending[name]

    def finish(self) -> None:
        for name, p in self.pending.items():
            allowed = p.conditioned if p.conditioned is not None else torch.full_like(p.exact[..., 0], self.tol)
            if p.kernel is not None:
                allowed = torch.maximum(allowed, p.kernel.to(allowed))
            self._update(name, p.got, p.exact, allowed, p.kernel, p.own)
        self.pending.clear()

    def _update(self, name: str, got: torch.Tensor, exact: torch.Tensor, allowed: torch.Tensor,
                kernel: torch.Tensor | None, own: torch.Tensor | None) -> None:
        self.report.outputs.setdefault(name, OutputError(name)).update(
            got, exact, offset=self.report.images, allowed=allowed, kernel=kernel, own=own, tolerance=self.tol)


@torch.inference_mode()
def check_parity(
    source: nn.Module,
    baked: nn.Module,
    recipe: Recipe,
    batches: Iterable[torch.Tensor],
    *,
    adapter: Adapter,
    tolerance: float = FP32_TOLERANCE,
    seed: int = 0,
    on_baked_batch: Optional[Callable[[nn.Module, torch.Tensor], Any]] = None,
) -> ParityReport:
    """Judge `baked` against the hooked reference on `source` run in float64 (surgery/core/judge.py): pooled
    output, every token (register included) and every block's residual stream, vector by vector.
    `baked` runs in its own dtype; each vector is also allowed KERNEL_FACTOR x the error of the hooked
    reference run in that dtype on this machine (judge.kernel_allowance; measured for float32 only where
    some vector exceeds `tolerance`, always for float16/bfloat16).

    Memory: no copy of either model. The source runs in float64 (or the half dtype) one block at a
    time (surgery/core/cast.py); batches are judged one by one and the float64 outputs are judged as they
    are computed, so the extra memory is one block's weights plus one batch of the baked model's
    residuals. `on_baked_batch(baked, pixels)`, if given, runs inside the baked model's pass (hooks
    placed by it see that pass: the effect statistics use it to cost no extra forward pass)."""
    fam = adapter
    require_same_architecture(source, baked, recipe, fam)
    source.eval()
    baked.eval()
    # a model may ask to be judged computing in another dtype than it is stored in (a VLM written in its
    # source's half dtype holds the source's weights exactly: it computes in float32, block by block)
    compute = getattr(baked, COMPUTE_DTYPE_ATTR, None)
    dtype = compute or next(baked.parameters()).dtype
    report = ParityReport(tolerance=tolerance, dtype=str(dtype).replace("torch.", ""))
    blocks = fam.blocks(source)
    total = sum(len(b) for b in batches) if isinstance(batches, (list, tuple)) else None
    with stage("float64 check against the hooked reference", total, unit="image") as progress:
        for pixels in batches:
            _judge_batch(report, source, baked, recipe, fam, pixels, blocks, tolerance, seed, on_baked_batch, compute)
            progress.advance(pixels.shape[0])
    return report


def _judge_batch(report: ParityReport, source: nn.Module, baked: nn.Module, recipe: Recipe, fam: Adapter,
                 pixels: torch.Tensor, blocks: list[nn.Module], tolerance: float, seed: int,
                 on_baked_batch: Optional[Callable[[nn.Module, torch.Tensor], Any]],
                 compute: Optional[torch.dtype] = None) -> None:
    """One batch of check_parity: the baked model's pass (in `compute`, the dtype check_parity read off
    the model, else its own), then the float64 reference's (and the allowance runs where needed), judged
    as they stream."""
    from .reference import hooked_reference

    dev = next(baked.parameters()).device
    dtype = compute or next(baked.parameters()).dtype
    half = dtype in (torch.float16, torch.bfloat16)
    src_dev = next(source.parameters()).device
    got: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        if compute is not None:
            stack.enter_context(cast_blockwise(baked, fam.blocks(baked), compute))
        if on_baked_batch is not None:
            stack.enter_context(on_baked_batch(baked, pixels))
        _stream(baked, fam, pixels.to(dev, dtype), got.__setitem__)
    own: dict[str, torch.Tensor] = {}
    if half:
        with cast_blockwise(source, blocks, dtype), hooked_reference(source, recipe, adapter=fam):
            _stream(source, fam, pixels.to(src_dev, dtype), own.__setitem__)
    judge = _BatchJudge(report, got, own, tolerance)
    x64 = pixels.to(src_dev, torch.float64)
    with cast_blockwise(source, blocks, torch.float64), hooked_reference(source, recipe, adapter=fam):
        _stream(source, fam, x64, judge.exact)
    # The allowance runs, cheapest first: what this machine's kernels do to the unmodified model (a pass in
    # the model's dtype), then, only for vectors still out of max(tolerance, that), the float64 conditioning
    # pass (at VLM size each pass streams the whole language model: one fewer is minutes).
    if judge.pending and not half:
        with cast_blockwise(source, blocks, dtype), hooked_reference(source, recipe, adapter=fam):
            _stream(source, fam, pixels.to(src_dev, dtype), judge.own_error)
        judge.settle()
    if judge.pending:
        with cast_blockwise(source, blocks, torch.float64), hooked_reference(source, recipe, adapter=fam), \
                float32_sized_noise(source, seed):
            _stream(source, fam, x64, judge.conditioning)
    judge.finish()
    if judge.got:
        extra = sorted(judge.got)[0]
        raise ParityError(f"the baked model has an output {extra!r} the source does not: it is not the "
                          "source's architecture")
    report.images += pixels.shape[0]
