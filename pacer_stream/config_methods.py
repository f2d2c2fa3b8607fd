"""What each merge method accepts: its number of models and whether it takes a base, the
``parameters`` (and per-model settings) it reads, and the check of every value.

A plan that sets a value its method would not read is refused by name, as is a value out
of its range; per-tensor settings (filters, gradients) are checked value by value
(methods/schedule.py).
"""

from __future__ import annotations

from typing import Any

from .config_schema import ModelEntry, as_number
from .errors import PacerError
from .io.sources import ModelRef
from .methods import schedule

METHODS = ("pacer", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "split_merge",
           "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "slerp", "nuslerp",
           "multislerp", "karcher", "model_stock", "passthrough")
PER_MODEL_KEYS = ("weight", "density", "epsilon", "gamma", "scale")  # parameters a model
# entry may set for itself
PARAMETER_KEYS = ("weight", "density", "lambda", "normalize", "rescale", "epsilon", "gamma",
                  "t", "nuslerp_flatten", "nuslerp_row_wise", "normalize_weights", "eps",
                  "max_iter", "tol", "filter_wise", "scale")
RESCALES = ("inverse_density", "l1", "none")
# What each method reads of `parameters` (and of a model entry's weight/density). A plan
# that sets anything else is refused by name: a value that is silently ignored is a lie.
METHOD_PARAMETERS: dict[str, tuple[str, ...]] = {
    "linear": ("weight", "normalize"),
    "task_arithmetic": ("weight", "lambda", "normalize"),
    "ties": ("weight", "density", "lambda", "normalize"),
    "dare_linear": ("weight", "density", "lambda", "normalize", "rescale"),
    "dare_ties": ("weight", "density", "lambda", "normalize", "rescale"),
    "pacer": ("weight", "normalize"),  # the dense layers are the (weighted) mean
    "split_merge": ("density",),
    "della": ("weight", "density", "epsilon", "lambda", "normalize", "rescale"),
    "della_linear": ("weight", "density", "epsilon", "lambda", "normalize", "rescale"),
    "breadcrumbs": ("weight", "density", "gamma", "lambda", "normalize", "rescale"),
    "breadcrumbs_ties": ("weight", "density", "gamma", "lambda", "normalize", "rescale"),
    "slerp": ("t",),
    "nuslerp": ("weight", "nuslerp_flatten", "nuslerp_row_wise"),
    "multislerp": ("weight", "normalize_weights", "eps"),
    "karcher": ("max_iter", "tol"),
    "model_stock": ("filter_wise",),
    "passthrough": ("scale",),
}
# Methods that need a base_model (task arithmetic and mergekit's base-required methods).
BASE_METHODS = ("task_arithmetic", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties",
                "slerp", "model_stock")
# How many models a method merges, a base listed among them not counted (mergekit's
# contracts): (at least, at most or None). Any other method: at least two.
MODEL_COUNTS: dict[str, tuple[int, int | None]] = {
    "slerp": (1, 1), "nuslerp": (2, 2), "multislerp": (1, None), "model_stock": (2, None),
    "passthrough": (1, 1)}
# Methods whose values hold for the whole model (no per-tensor filters or gradients).
WHOLE_MODEL_METHODS = ("pacer", "split_merge")
# Methods that ignore a base model (linear averages the models; split_merge is base-free).
BASE_FREE_METHODS = ("linear", "split_merge", "karcher", "passthrough")
BASE_FREE_REASONS = {"linear": "averages the models themselves",
                     "split_merge": "is base-free (μ is the models' mean)",
                     "karcher": "is the models' mean on the sphere (list the base among the "
                                "models to include it)",
                     "passthrough": "copies its one model"}


def _number_check(value: Any, where: str) -> None:
    as_number(value, where)


def _density_check(value: Any, where: str) -> None:
    if not 0 < as_number(value, where) <= 1:
        raise PacerError(f"{where} must be in (0, 1], got {value}")


def _bool_check(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise PacerError(f"{where} must be true or false, got {value!r}")


def _rescale_check(value: Any, where: str) -> None:
    if value not in RESCALES:
        raise PacerError(f"{where}: expected one of {', '.join(RESCALES)}, got {value!r}")


def _unit_check(value: Any, where: str) -> None:
    if not 0 <= as_number(value, where) <= 1:
        raise PacerError(f"{where} must be in [0, 1], got {value}")


def _epsilon_check(value: Any, where: str) -> None:
    if not 0 <= as_number(value, where) < 0.5:
        raise PacerError(f"{where} must be in [0, 0.5) (density ± epsilon are probabilities), "
                         f"got {value}")


def _positive_check(value: Any, where: str) -> None:
    if as_number(value, where) <= 0:
        raise PacerError(f"{where} must be positive, got {value}")


def _count_check(value: Any, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PacerError(f"{where} must be a positive integer, got {value!r}")


def check_model_count(method: str, entries: tuple[ModelEntry, ...], base: ModelRef | None,
                      label: str) -> None:
    """A method's number of models (MODEL_COUNTS), a base listed among them not counted."""
    if method not in MODEL_COUNTS:
        return
    low, high = MODEL_COUNTS[method]
    key = (base.path, base.repo_id, base.revision) if base is not None else None
    listed = sum((e.ref.path, e.ref.repo_id, e.ref.revision) == key for e in entries)
    count = len(entries) - listed
    if count < low or (high is not None and count > high):
        want = f"exactly {low}" if low == high else f"at least {low}"
        besides = " besides its base_model" if method in BASE_METHODS or base is not None else ""
        raise PacerError(f"{label}: method {method} merges {want} model(s){besides}, got "
                         f"{count}; list them under models")


def check_method_values(method: str, parameters: dict, entries: tuple[ModelEntry, ...],
                        label: str) -> None:
    """What only a method and a combination of values show (one value is checked alone)."""
    if method == "slerp" and "t" not in parameters:
        raise PacerError(f"{label}: method slerp needs parameters.t (0 gives the base_model, 1 "
                         "the other model)")
    if method.startswith("breadcrumbs") and parameters.get("rescale") == "inverse_density":
        raise PacerError(f"{label}: parameters.rescale inverse_density has no meaning for "
                         f"{method} (nothing is dropped at random); use l1 or none")
    if method.startswith("della"):  # where both are one number; per tensor: methods/dense.py
        for i, entry in enumerate(entries):
            d = entry.parameters.get("density", parameters.get("density", 1.0))
            e = entry.parameters.get("epsilon", parameters.get("epsilon", 0.15))
            if schedule.is_scalar(d) and schedule.is_scalar(e) and d < 1 \
                    and not (d - e > 0 and d + e < 1):
                raise PacerError(f"{label}: models[{i}]: della needs density - epsilon > 0 "
                                 f"and density + epsilon < 1, got density {d}, epsilon {e}")


# The check of one value of each parameter (a filter/gradient setting has each of its
# values checked; methods/schedule.py). Every key of PARAMETER_KEYS has one.
PARAMETER_CHECKS: dict[str, Any] = {
    "weight": _number_check,
    "lambda": _number_check,
    "density": _density_check,
    "normalize": _bool_check,
    "rescale": _rescale_check,
    "epsilon": _epsilon_check,
    "gamma": _unit_check,
    "t": _unit_check,
    "scale": _number_check,
    "nuslerp_flatten": _bool_check,
    "nuslerp_row_wise": _bool_check,
    "normalize_weights": _bool_check,
    "filter_wise": _bool_check,
    "eps": _positive_check,
    "tol": _positive_check,
    "max_iter": _count_check,
}


def check_parameters(p: dict, where: str) -> None:
    """Types and ranges of parameter settings (each method checks its combination)."""
    for key, setting in p.items():
        for value, at in schedule.scalars(setting, f"{where}.{key}"):
            PARAMETER_CHECKS[key](value, at)


def check_used(method: str, parameters: dict, entries: tuple[ModelEntry, ...],
               base: ModelRef | None, label: str) -> None:
    """Refuse every value the method would not read (see METHOD_PARAMETERS)."""
    uses = METHOD_PARAMETERS[method]
    hint = {"pacer": {"density": " (PACER's dense layers are the models' mean)"}}.get(
        method, {})
    for key in parameters:
        if key not in uses:
            raise PacerError(f"{label}: parameters.{key} has no effect with method {method}"
                             f"{hint.get(key, '')}; remove it (method {method} reads: "
                             f"{', '.join(uses)})")
    for i, entry in enumerate(entries):
        for key in PER_MODEL_KEYS:
            if key in entry.parameters and key not in uses:
                raise PacerError(f"{label}: models[{i}].{key} has no effect with method "
                                 f"{method}{hint.get(key, '')}; remove it")
    if method in WHOLE_MODEL_METHODS:
        varying = schedule.varies(parameters) + [
            f"models[{i}].{k}" for i, e in enumerate(entries) for k in schedule.varies(e.parameters)]
        if varying:
            raise PacerError(f"{label}: {varying[0]} varies by tensor (a filter or gradient), but "
                             f"method {method} uses one value per model for the whole model; "
                             "give one number")
    if base is not None and method in BASE_FREE_METHODS:
        what = BASE_FREE_REASONS[method]
        raise PacerError(f"{label}: method {method} {what}, so base_model would be ignored; "
                         "remove base_model" + (" or use task_arithmetic" if method == "linear"
                                                else ""))
