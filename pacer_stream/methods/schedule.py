"""Parameter values that vary by tensor: mergekit's filters and layer gradients.

A parameter's *setting*, in a plan's ``parameters`` or a model entry, is one of::

    0.5                              the value for every tensor
    [0, 0.5, 1]                      a gradient over the layers (below)
    {filter: self_attn, value: S}    S (a scalar or a gradient) for the tensors whose name
                                     contains "self_attn"; no filter, or "*", matches all
    [{filter: mlp, value: S1}, {value: S2}]
                                     the first entry that matches the tensor

A gradient [v_0, …, v_K] is the piecewise-linear curve through the v's at t = 0, 1/K, …, 1;
the tensors of block i of L take its value at t = i / (L − 1) (t = 1 when L = 1), and the
tensors outside the blocks (embeddings, final norm, head) take t = 0. A gradient of
booleans or strings picks v_⌊t·K⌋. A setting that matches no filter gives no value here:
the model's own setting falls back to the plan's, the plan's to the method's default.

These are mergekit's semantics (``mergekit.config.evaluate_setting``; t from its planner),
so a mergekit YAML means the same here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import PacerError

SCALARS = (int, float, bool, str)


def is_scalar(setting: Any) -> bool:
    return isinstance(setting, SCALARS)


def scalars(setting: Any, where: str) -> Iterator[tuple[Any, str]]:
    """Every scalar in a setting with where it sits, after checking the setting's shape."""
    if is_scalar(setting):
        yield setting, where
    elif isinstance(setting, Mapping):
        unknown = [k for k in setting if k not in ("filter", "value")]
        if unknown or "value" not in setting:
            raise PacerError(f"{where}: a conditional value is {{filter: <part of a tensor "
                             f"name>, value: <value>}}, got {dict(setting)!r}")
        if setting.get("filter") is not None and not isinstance(setting["filter"], str):
            raise PacerError(f"{where}.filter must be a string, got {setting['filter']!r}")
        value = setting["value"]
        if not (is_scalar(value) or _is_gradient(value)):
            raise PacerError(f"{where}.value must be a number or a list of numbers, got "
                             f"{value!r}")
        yield from scalars(value, f"{where}.value")
    elif isinstance(setting, list) and setting:
        if _is_gradient(setting):
            for i, v in enumerate(setting):
                yield v, f"{where}[{i}]"
        elif all(isinstance(e, Mapping) for e in setting):
            for i, e in enumerate(setting):
                yield from scalars(e, f"{where}[{i}]")
        else:
            raise PacerError(f"{where}: a list is either a gradient of values or a list of "
                             f"{{filter, value}} entries, not both, got {setting!r}")
    else:
        raise PacerError(f"{where}: expected a value, a gradient list or {{filter, value}} "
                         f"entries, got {setting!r}")


def _is_gradient(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(is_scalar(v) for v in value)


def layer_position(layer: int | None, num_layers: int) -> float:
    """t of a tensor: i / (L − 1) in block i, 1 for a one-block model, 0 outside the blocks."""
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def value_at(setting: Any, tensor: str, t: float) -> Any:
    """The setting's value for ``tensor`` at layer position ``t``; None if no filter matches."""
    if is_scalar(setting):
        return setting
    if isinstance(setting, Mapping):
        setting = [setting]
    if _is_gradient(setting):
        return _interpolate(setting, t)
    for entry in setting:
        pattern = entry.get("filter")
        if pattern is None or pattern == "*" or pattern in tensor:
            return value_at(entry["value"], tensor, t)
    return None


def _interpolate(values: list, t: float) -> Any:
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not numeric:
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def resolve(settings: Mapping[str, Any], tensor: str, t: float) -> dict[str, Any]:
    """Every setting's value for one tensor (the keys no filter matches are left out)."""
    out = {}
    for key, setting in settings.items():
        value = value_at(setting, tensor, t)
        if value is not None:
            out[key] = value
    return out


def varies(settings: Mapping[str, Any]) -> list[str]:
    """The keys whose setting is not one scalar."""
    return [k for k, v in settings.items() if not is_scalar(v)]


def first_then(first: Mapping[str, Any], then: Mapping[str, Any]) -> dict[str, Any]:
    """Settings where ``first`` takes precedence over ``then`` key by key, but a tensor that
    none of its filters match falls back to ``then`` (mergekit's precedence of a slice's
    parameters over the top level's)."""
    out = dict(then)
    for key, setting in first.items():
        out[key] = _conditions(setting) + _conditions(then[key]) if key in then else setting
    return out


def _conditions(setting: Any) -> list:
    if isinstance(setting, list) and setting and all(isinstance(e, Mapping) for e in setting):
        return list(setting)
    if isinstance(setting, Mapping):
        return [setting]
    return [{"value": setting}]
