"""The ``pacer:`` section: its values' types and ranges, the routers and sample-fitted rules
(``router``, ``router_samples``, ``dense``, ``vocabulary``) resolved to what a run does, and
the values PACER's dense path would ignore, refused.

Its keys and defaults are config_schema.PACER_DEFAULTS. parse_plan (config.py) applies
these for method pacer; other methods may set only ALIGN_PACER_KEYS, and only when they
align.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config_models import anchor_ref
from .config_schema import ANCHORS, ModelEntry, as_mapping, as_number
from .errors import PacerError

ROUTER_MODES = ("linear", "deviation_norm")
ROUTERS = ("few_shot", "data_free")
DENSE_RULES = ("regmean", "mean")  # pacer.dense: how linear layers that are not upcycled merge
VOCABULARY_RULES = ("usage", "mean")  # pacer.vocabulary: how token-embedding / LM-head rows merge
# PACER's dense layers are the consensus mean: on benchmarks/quality no TIES/DARE rule,
# with the base or around a pseudo-base, beat the mean on both tasks. The values only a
# TIES/DARE dense path would read are refused (the methods themselves remain).
DENSE_ONLY_PACER_KEYS = ("dropout_rate",)
DENSE_ONLY_PARAMETERS = ("lambda", "rescale")
# The pacer keys a method other than pacer reads: those of the alignment, when it aligns.
ALIGN_PACER_KEYS = ("anchor_strategy", "max_sweeps")


def check_pacer(p: dict, where: str) -> None:
    value = as_number(p["interference_threshold"], f"{where}.interference_threshold")
    if not 0 <= value < 2:
        raise PacerError(f"{where}.interference_threshold out of range: {value}")
    if p["router_mode"] not in ROUTER_MODES:
        raise PacerError(f"{where}.router_mode: expected one of {', '.join(ROUTER_MODES)}, got "
                         f"{p['router_mode']!r}")
    if not isinstance(p["tome_r"], int) or isinstance(p["tome_r"], bool) or p["tome_r"] < 0:
        raise PacerError(f"{where}.tome_r must be a non-negative integer, got {p['tome_r']!r}")
    for key in ("top_k_experts", "max_sweeps"):
        if not isinstance(p[key], int) or isinstance(p[key], bool) or p[key] < 1:
            raise PacerError(f"{where}.{key} must be a positive integer, got {p[key]!r}")
    if not isinstance(p["anchor_strategy"], str) or not p["anchor_strategy"]:
        raise PacerError(f"{where}.anchor_strategy: expected one of {', '.join(ANCHORS)} or one "
                         f"of the models, got {p['anchor_strategy']!r}")
    for key in ("enable_moe_upcycle", "align"):
        if not isinstance(p[key], bool):
            raise PacerError(f"{where}.{key} must be true or false, got {p[key]!r}")
    if p["max_param_growth"] is not None \
            and as_number(p["max_param_growth"], f"{where}.max_param_growth") < 1:
        raise PacerError(f"{where}.max_param_growth must be at least 1.0")
    if p["upcycle_fraction"] is not None:
        if not 0 <= as_number(p["upcycle_fraction"], f"{where}.upcycle_fraction") <= 1:
            raise PacerError(f"{where}.upcycle_fraction must be in [0, 1], got "
                             f"{p['upcycle_fraction']}")
        if p["max_param_growth"] is not None:
            raise PacerError(f"{where}: give max_param_growth or upcycle_fraction, not both")
    if p["max_experts"] is not None and (not isinstance(p["max_experts"], int) or isinstance(
            p["max_experts"], bool) or p["max_experts"] < 2):
        raise PacerError(f"{where}.max_experts must be an integer of at least 2, got "
                         f"{p['max_experts']!r}")
    if not 0 <= as_number(p["expert_distance"], f"{where}.expert_distance") <= 2:
        raise PacerError(f"{where}.expert_distance must be in [0, 2] (a cosine distance), got "
                         f"{p['expert_distance']}")
    if not 0 <= as_number(p["regmean_alpha"], f"{where}.regmean_alpha") <= 1:
        raise PacerError(f"{where}.regmean_alpha must be in [0, 1], got {p['regmean_alpha']}")
    if not 0 <= as_number(p["router_holdout"], f"{where}.router_holdout") < 1:
        raise PacerError(f"{where}.router_holdout must be in [0, 1), got {p['router_holdout']}")
    if as_number(p["router_temperature"], f"{where}.router_temperature") <= 0:
        raise PacerError(f"{where}.router_temperature must be positive, got "
                         f"{p['router_temperature']}")


def check_pacer_dense(given: dict, parameters: dict, label: str) -> None:
    """PACER's dense layers are the mean: DARE/TIES values would have no effect."""
    for key in DENSE_ONLY_PACER_KEYS:
        if key in given:
            raise PacerError(f"{label}: pacer.{key} has no effect: PACER merges its dense layers "
                             "as the models' mean (measured better than DARE/TIES on "
                             "benchmarks/quality); remove it, or use method: dare_ties")
    for key in DENSE_ONLY_PARAMETERS:
        if key in parameters:
            raise PacerError(f"{label}: parameters.{key} has no effect: PACER merges its dense "
                             "layers as the models' mean; remove it, or use method: dare_ties")


def router_samples(raw: Any, entries: tuple[ModelEntry, ...], base_dir: Path,
                   where: str) -> dict[int, Path] | None:
    """``router_samples: {model: file}`` -> {model index: file}, one file for every model."""
    if raw is None:
        return None
    raw = as_mapping(raw, where)
    samples: dict[int, Path] = {}
    for key, file in raw.items():
        ref = anchor_ref(str(key), entries, None, base_dir, f"{where}: key", also=())
        k = next(i for i, e in enumerate(entries) if e.ref is ref)
        if not isinstance(file, str) or not file:
            raise PacerError(f"{where}.{key}: expected the path of a file of sample lines, got "
                             f"{file!r}")
        path = Path(file).expanduser()
        path = (base_dir / path if not path.is_absolute() else path).resolve()
        if not path.is_file():
            raise PacerError(f"{where}.{key}: sample file {path} not found")
        samples[k] = path
    missing = [e.ref.text for i, e in enumerate(entries) if i not in samples]
    if missing:
        raise PacerError(f"{where}: no sample file for {', '.join(missing)}; the few-shot router "
                         "needs samples of every model")
    return samples


def router_kind(pacer: dict, where: str) -> str | None:
    """The gate's kind: few_shot when samples are given (the default then); data_free only
    when asked for; None (no block is upcycled) otherwise: on benchmarks/quality the
    data-free gate routed no better than chance and its MoE was worse than the mean."""
    router = pacer["router"]
    if router is None:
        return "few_shot" if pacer["router_samples"] else None
    if router not in ROUTERS:
        raise PacerError(f"{where}: expected one of {', '.join(ROUTERS)}, got {router!r}")
    if router == "few_shot" and not pacer["router_samples"]:
        raise PacerError(f"{where}: few_shot needs pacer.router_samples ({{model: file of "
                         "sample lines}}); or use router: data_free")
    return router


def sample_rule(pacer: dict, key: str, rules: tuple[str, ...], purpose: str,
                where: str) -> str:
    """``pacer.vocabulary`` / ``pacer.dense``: ``rules[0]`` is fitted to samples (the default
    when there are any) and is refused without them; ``mean`` needs nothing."""
    rule = pacer[key]
    if rule is None:
        return rules[0] if _has_samples(pacer) else "mean"
    if rule not in rules:
        raise PacerError(f"{where}: expected one of {', '.join(rules)}, got {rule!r}")
    if rule == rules[0] and not _has_samples(pacer):
        raise PacerError(f"{where}: {rule} needs samples {purpose}: pacer.router_samples "
                         "({model: file of sample lines}) or router: data_free (each model "
                         "writes its own); or use mean")
    return rule


def _has_samples(pacer: dict) -> bool:
    """Sample lines given, or the data-free router, whose samples the models write."""
    return bool(pacer["router_samples"]) or pacer["router"] == "data_free"
