"""Dense merge methods: linear, task arithmetic, TIES, DARE, DELLA and Model
Breadcrumbs (each linear and with TIES election).

All of them, for one tensor with N model copies X_k and weights w_k::

    B     = base model; without one, a pseudo-base (below)
    D_k   = X_k - B                                   (task vectors)
    D_k  <- sparsify(D_k)                              (TIES: top-k magnitude;
                                                        DARE: random drop + rescale;
                                                        DELLA: random drop, keep
                                                        probability by magnitude rank
                                                        in the row, + rescale;
                                                        Breadcrumbs: drop the largest
                                                        gamma share and the smallest)
    W_k   = w_k * D_k                                  (weights apply before election)
    TIES: keep W_k where sign(W_k) == s, with s the elected sign
    out   = B + lambda * sum(W_k) / (normalize ? sum of kept w_k : 1)

With a base, s = sign(sum_k W_k) (a zero sum counts as +), as mergekit elects.

Without a base (base-free), the first design here took B = mean(X_k) and elected by
the sum. That is degenerate: sum_k D_k = 0 by construction, so the sign of the sum is
a coin flip per element (for N = 2 it returned the element-wise maximum of the two
models 80 % of the time, the minimum otherwise). Base-free, the sign-electing methods
therefore use

    B = median_k X_k  (element-wise; for N = 2 the median is the mean)
    s = sign(sum_k sign(W_k))                         (a vote by count; 0 keeps B)

The median is the location estimate a single far-moved model cannot drag: where one
model moved an entry and the others did not, B stays at the others' value and that
model's change survives whole. Where the votes tie (always, for N = 2: the two task
vectors are opposite), nothing is added and the entry is B, the plain average for
N = 2. Methods without election (task arithmetic, DARE linear) take B = mean(X_k).

``linear`` is sum(w_k X_k) / sum(w_k). Semantics follow mergekit's
generalized task arithmetic where it has the method, with one documented
difference: DARE rescales kept entries by 1/density as in the DARE paper;
``rescale: l1`` gives mergekit's L1-norm-ratio rescaling instead.

DELLA and Breadcrumbs need a base (mergekit's contract) and follow mergekit's
``della_magprune`` / ``magnitude_outliers`` (methods/sparsify.py); DELLA's random draws
are this package's own seeded ones, so its masks have mergekit's distribution, not its
bits.

This module also holds the table of every method (:data:`METHODS`) and their resolved
parameters (:class:`MethodParams`); the methods of other families (spherical.py,
model_stock.py, passthrough.py) are built by registry.py.

A :class:`TensorMerge` sees a tensor in row slices and may need observation passes
before merging (exact magnitude thresholds, L1 sums), so results never depend on
how a tensor was sliced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import PacerError
from .gram import BlockSum
from .sparsify import (MagnitudeSelect, OutlierBand, dare_keep, della_probabilities,
                       magnitude_bits, uniform_draws)
from .vocabulary import merge_rows

if TYPE_CHECKING:
    from ..config_schema import PlanConfig

L1_EPS = 1e-7  # mergekit's tolerance below which no rescaling happens


@dataclass(frozen=True)
class MethodDef:
    """A dense method, as data."""

    name: str
    sparsify: str | None  # "magnitude" (TIES) | "random" (DARE) | "della" | "outliers"
    # (Breadcrumbs) | None
    consensus: bool  # TIES sign election
    normalize: bool  # default: divide by the (kept) weights
    rescale: str = "none"  # default DARE / DELLA / Breadcrumbs rescaling
    linear: bool = False  # average the models themselves, no task vectors
    family: str = "dense"  # which module merges it (registry.py): dense, spherical,
    # model_stock, passthrough


METHODS: dict[str, MethodDef] = {
    "linear": MethodDef("linear", None, False, True, linear=True),
    "task_arithmetic": MethodDef("task_arithmetic", None, False, False),
    "ties": MethodDef("ties", "magnitude", True, True),
    "dare_linear": MethodDef("dare_linear", "random", False, False, "inverse_density"),
    "dare_ties": MethodDef("dare_ties", "random", True, False, "inverse_density"),
    # mergekit's defaults: DELLA rescales by the L1 ratio, Breadcrumbs does not rescale
    "della": MethodDef("della", "della", True, True, "l1"),
    "della_linear": MethodDef("della_linear", "della", False, False, "l1"),
    "breadcrumbs": MethodDef("breadcrumbs", "outliers", False, False),
    "breadcrumbs_ties": MethodDef("breadcrumbs_ties", "outliers", True, False),
    "slerp": MethodDef("slerp", None, False, False, family="spherical"),
    "nuslerp": MethodDef("nuslerp", None, False, False, family="spherical"),
    "multislerp": MethodDef("multislerp", None, False, False, family="spherical"),
    "karcher": MethodDef("karcher", None, False, False, family="spherical"),
    "model_stock": MethodDef("model_stock", None, False, False, family="model_stock"),
    "passthrough": MethodDef("passthrough", None, False, False, family="passthrough"),
}

# Defaults of the values only some methods read (mergekit's): DELLA's epsilon,
# Breadcrumbs' gamma, the spherical methods' and Model Stock's switches.
DEFAULTS: dict[str, Any] = {
    "epsilon": 0.15, "gamma": 0.01, "filter_wise": False, "nuslerp_flatten": True,
    "nuslerp_row_wise": False, "normalize_weights": True, "eps": 1e-8, "max_iter": 10,
    "tol": 1e-5,
}


def pacer_dense(config: "PlanConfig") -> tuple[str, dict]:
    """PACER's dense path (every layer not upcycled): the models' (weighted) mean, with or
    without a base. On benchmarks/quality it kept more of the experts' gains than TIES or
    DARE with the base and than the base-free TIES above (the module docstring), on both
    the text and the image task."""
    return "linear", dict(config.parameters)


@dataclass(frozen=True)
class MethodParams:
    """Resolved parameters of one merge (per-model lists have one entry per model)."""

    method: MethodDef
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    lam: float = 1.0
    normalize: bool = True
    rescale: str = "none"
    seed: int = 0
    epsilons: tuple[float, ...] = ()  # DELLA, per model
    gammas: tuple[float, ...] = ()  # Breadcrumbs, per model
    scales: tuple[float | None, ...] = ()  # passthrough, per model (None: no scaling)
    t: float | None = None  # slerp (None: no value for this tensor)
    switches: Mapping[str, Any] = field(default_factory=dict)  # the DEFAULTS keys

    def switch(self, key: str) -> Any:
        """A value of :data:`DEFAULTS` (filter_wise, eps, ...), as resolved."""
        return self.switches.get(key, DEFAULTS[key])

    @classmethod
    def resolve(cls, method: str, models, parameters: Mapping[str, Any], seed: int
                ) -> "MethodParams":
        """From a plan's values for one tensor: per-model values win over plan-level
        ``parameters``. ``models`` are the plan's model entries or, for one tensor, each
        model's values as a mapping (methods/schedule.py resolves filters and gradients to
        such scalars). Types and ranges were checked with the plan (config_methods.py); what only
        the combination shows is checked here."""
        if method not in METHODS:
            raise PacerError(f"method {method!r} is not a dense method ({', '.join(METHODS)})")
        mdef = METHODS[method]
        per_model = [m if isinstance(m, Mapping) else m.parameters for m in models]

        def each(key: str, default: Any) -> tuple[Any, ...]:
            plan_value = parameters.get(key, default)
            return tuple(m.get(key, plan_value) for m in per_model)

        weights = tuple(map(float, each("weight", 1.0)))
        densities = tuple(map(float, each("density", 1.0)))
        rescale = parameters.get("rescale", mdef.rescale)
        normalize = parameters.get("normalize", mdef.normalize)
        lam = parameters.get("lambda", 1.0)
        if normalize and abs(sum(weights)) < 1e-8 and mdef.linear:
            raise PacerError("parameters: model weights sum to zero; cannot normalize")
        epsilons = tuple(map(float, each("epsilon", DEFAULTS["epsilon"])))
        if mdef.sparsify == "della":
            for k, (d, e) in enumerate(zip(densities, epsilons)):
                if d < 1 and not (d - e > 0 and d + e < 1):
                    raise PacerError(f"models[{k}]: della needs density - epsilon > 0 and "
                                     f"density + epsilon < 1, got density {d}, epsilon {e}")
        t = parameters.get("t")
        return cls(mdef, weights, densities, float(lam), normalize, rescale, seed,
                   epsilons, tuple(map(float, each("gamma", DEFAULTS["gamma"]))),
                   each("scale", None), None if t is None else float(t),
                   {k: parameters[k] for k in DEFAULTS if k in parameters})


class TensorMerge:
    """Merges one tensor, slice by slice, after any observation passes it needs.

    The executor calls, for every slice: ``anchor, d = split(x, base)`` (in place:
    ``x`` becomes the task vectors), then ``observe(pass, rows, d)`` for each of
    :attr:`passes`, then ``merge(rows, anchor, d)``. The slices are row chunks of a
    few hundred thousand elements (accounting.compute_chunks); every pass splits them
    again from the bytes read, as holding a whole tensor's fp32 split costs more in
    page faults than the split itself.
    """

    def __init__(self, name: str, shape: tuple[int, ...], params: MethodParams,
                 row_weights: torch.Tensor | None = None) -> None:
        self.name, self.shape, self.p = name, shape, params
        if row_weights is not None and not params.method.linear:
            raise PacerError(f"{name}: per-row weights (pacer.vocabulary usage) need the "
                             f"linear rule, not {params.method.name}")
        self.row_weights = row_weights  # [N, rows]: vocabulary.py's r_k(t), else None
        numel = 1
        for d in shape:
            numel *= d
        m = params.method
        self.select: list[MagnitudeSelect] | list[OutlierBand] | None = None
        if m.sparsify == "magnitude":
            self.select = [MagnitudeSelect(numel, d) for d in params.densities]
        elif m.sparsify == "outliers":
            self.select = [OutlierBand(numel, d, g)
                           for d, g in zip(params.densities, params.gammas)]
        self.vote_by_count = False  # set by split(): base-free sign election (docstring)
        # L1 norms before and after the drop, per row in fp64 and summed in fixed blocks of
        # rows (gram.BlockSum), so the ratio is the same number however the tensor is sliced
        self.l1: dict[int, BlockSum] | None = None
        if m.sparsify is not None and params.rescale == "l1":
            rows = shape[0] if shape else 1
            self.l1 = {k: BlockSum(rows, max(1, numel // max(1, rows)))
                       for k, d in enumerate(params.densities) if d < 1}
        self._l1_ratio: dict[int, float] = {}
        self._blocks: list[dict] = [{} for _ in params.weights]  # sparsify.uniform_draws
        # DELLA ranks a vector (a tensor of < 2 axes) as one row: its magnitudes are
        # observed whole first (a vector is small), as a row slice cannot rank them.
        self.magnitudes = torch.zeros(len(params.weights), numel) \
            if m.sparsify == "della" and len(shape) < 2 else None

    @property
    def passes(self) -> list[str]:
        """Observation passes needed before :meth:`merge`."""
        passes = []
        if self.select is not None:
            passes += ["magnitude-high", "magnitude-low"]
        if self.magnitudes is not None:
            passes.append("della-magnitudes")
        return passes + (["l1-norms"] if self.l1 is not None else [])

    def split(self, x: torch.Tensor, base: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(anchor, task vectors): x [N, ...] fp32 is turned into x - anchor in place."""
        if self.p.method.linear:
            return torch.zeros(()), x  # linear works on the models themselves
        self.vote_by_count = base is None and self.p.method.consensus
        if base is not None:
            anchor = base
        elif self.vote_by_count:
            anchor = median(x)
        else:
            anchor = x.mean(0)
        return anchor, x.sub_(anchor)

    def observe(self, pass_name: str, rows: tuple[int, int], d: torch.Tensor) -> None:
        if rows[0] == 0 and pass_name == "l1-norms" and self.select is not None:
            for select in self.select:  # the masks are handed out again from slice 0
                select.restart()
        for k in range(d.shape[0]):
            if pass_name == "magnitude-high":
                self.select[k].observe_high(magnitude_bits(d[k]))
            elif pass_name == "magnitude-low":
                self.select[k].observe_low(magnitude_bits(d[k]))
            elif pass_name == "della-magnitudes":
                self.magnitudes[k, rows[0]:rows[1]] = d[k].reshape(-1).abs()
            else:
                if self.p.densities[k] >= 1:
                    continue  # never sparsified, never rescaled
                keep = self._keep(rows, k, d[k])
                r = rows[1] - rows[0]
                before = d[k].abs().double().reshape(r, -1).sum(1)
                after = (d[k] * keep).abs().double().reshape(r, -1).sum(1)
                self.l1[k].add(rows[0], torch.stack([before, after], 1))

    def merge(self, rows: tuple[int, int], anchor: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Merged rows (fp32) from the split of one slice; ``d`` is consumed."""
        p, m = self.p, self.p.method
        n = d.shape[0]
        if m.linear and self.row_weights is not None:  # token rows by usage (vocabulary.py)
            return merge_rows(d, self.row_weights[:, rows[0]:rows[1]])
        if m.linear:  # here d holds the models themselves
            out = d[0] * p.weights[0]
            for k in range(1, n):
                out.add_(d[k], alpha=p.weights[k])
            return out.div_(sum(p.weights)) if p.normalize else out
        if m.sparsify in ("magnitude", "outliers"):
            for k in range(n):
                if rows[0] == 0:
                    self.select[k].restart()
                self.select[k].prune_(d[k], magnitude_bits(d[k]))
                if m.sparsify == "outliers" and p.densities[k] < 1 and self.l1 is not None:
                    d[k].mul_(self._dare_scale(k))
        elif m.sparsify == "random":
            for k in range(n):
                if p.densities[k] < 1:
                    d[k].mul_(self._dare(rows, k, d.device)).mul_(self._dare_scale(k))
        elif m.sparsify == "della":
            for k in range(n):
                if p.densities[k] < 1:
                    self._della_(rows, k, d[k])
        for k in range(n):
            if p.weights[k] != 1:
                d[k].mul_(p.weights[k])
        if m.consensus:
            # Keep entries whose sign matches the weighted sum's (a zero sum counts as +;
            # zeros agree with neither side). With s = that sign, an entry agrees iff
            # s * W_k > 0, so the kept sum is s * sum_k relu(s * W_k): float ops only.
            if self.vote_by_count:  # base-free (module docstring)
                s = d.sign().sum(0).sign_()
            else:
                s = (d.sum(0) >= 0).to(d.dtype).mul_(2).sub_(1)  # +1 / -1; torch.where's
                # values, in half its time
            agreeing = d.mul_(s).clamp_min_(0)
            mixed = agreeing.sum(0).mul_(s)
            weights = torch.tensor(p.weights, dtype=d.dtype, device=d.device)
            divisor = agreeing.sign_().mul_(weights.reshape(-1, *[1] * (d.dim() - 1))).sum(0)
            divisor[divisor == 0] = 1
        else:
            mixed = d.sum(0)
            total = sum(p.weights)
            divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total)
        if p.normalize:
            mixed /= divisor
        if p.lam != 1:
            mixed *= p.lam
        return mixed.add_(anchor)

    def _keep(self, rows: tuple[int, int], k: int, dk: torch.Tensor) -> torch.Tensor:
        """The keep mask of model k's task vector on these rows (before rescaling)."""
        m = self.p.method
        if m.sparsify == "random":
            return self._dare(rows, k, dk.device)
        if m.sparsify == "della":
            return self._draws(rows, k, dk) < self._della_p(rows, k, dk)
        return self.select[k].mask(magnitude_bits(dk)).reshape(dk.shape)

    def _della_p(self, rows: tuple[int, int], k: int, dk: torch.Tensor) -> torch.Tensor:
        """DELLA's keep probabilities (sparsify.della_probabilities) on these rows."""
        d, e = self.p.densities[k], self.p.epsilons[k]
        if self.magnitudes is None:  # rows are ranked within themselves
            return della_probabilities(dk.abs(), d, e).to(dk.device)
        whole = della_probabilities(self.magnitudes[k], d, e)
        return whole[rows[0]:rows[1]].reshape(dk.shape).to(dk.device)

    def _della_(self, rows: tuple[int, int], k: int, dk: torch.Tensor) -> None:
        """Drop, in place, what DELLA drops of model k's task vector, then rescale: by the
        L1 ratio (l1, mergekit's), by 1 / p per entry (inverse_density, the paper's)."""
        probs = self._della_p(rows, k, dk)
        dk.mul_(self._draws(rows, k, dk) < probs)
        if self.p.rescale == "inverse_density":
            dk.div_(probs)
        elif self.p.rescale == "l1":
            dk.mul_(self._dare_scale(k))

    def _draws(self, rows: tuple[int, int], k: int, dk: torch.Tensor) -> torch.Tensor:
        shape = self.shape if self.shape else (1,)
        draws = uniform_draws(shape, rows, self.p.seed, self.name, k, self._blocks[k])
        return draws.reshape(dk.shape).to(dk.device)

    def _dare(self, rows: tuple[int, int], k: int, device: torch.device) -> torch.Tensor:
        shape = self.shape if self.shape else (1,)
        keep = dare_keep(shape, rows, self.p.densities[k], self.p.seed, self.name, k,
                         self._blocks[k])
        return keep.reshape(-1, *shape[1:]).to(device)

    def _dare_scale(self, k: int) -> float:
        if self.p.rescale == "inverse_density":
            return 1.0 / self.p.densities[k]
        if self.p.rescale == "l1":
            if k not in self._l1_ratio:
                before, after = (float(v) for v in self.l1[k].total())
                self._l1_ratio[k] = before / after if before >= L1_EPS and after >= L1_EPS \
                    else 1.0
            return self._l1_ratio[k]
        return 1.0


MEDIAN_CHUNK = 1 << 16  # elements per model sorted at once: the sort's copy stays small


def median(x: torch.Tensor) -> torch.Tensor:
    """Element-wise median over dim 0 of ``x`` [N, ...]; for even N the mean of the two
    middle values (so N = 2 gives the mean), computed in column chunks."""
    n = x.shape[0]
    flat = x.reshape(n, -1)
    out = torch.empty(flat.shape[1], dtype=x.dtype, device=x.device)
    for start in range(0, flat.shape[1], MEDIAN_CHUNK):
        part = flat[:, start:start + MEDIAN_CHUNK].sort(0).values
        if n % 2:
            out[start:start + MEDIAN_CHUNK] = part[n // 2]
        else:
            out[start:start + MEDIAN_CHUNK] = (part[n // 2 - 1] + part[n // 2]) / 2
    return out.reshape(x.shape[1:])
