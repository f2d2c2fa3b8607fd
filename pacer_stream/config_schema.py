"""The validated plan's types: PlanConfig, ModelEntry, OutputSpec, the ``pacer:`` section's
defaults, and the checks every section of the plan shares (a mapping, a finite number,
known keys with a suggestion for a typo).

Nothing here reads a file: config.py parses a plan into these types, with the sections
validated by config_methods.py, config_models.py and config_pacer.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PacerError
from .io.sources import ModelRef
from .slices import SliceSpec

# pacer.anchor_strategy: these, or a reference to one of the models
ANCHORS = ("first", "lowest_magnitude")
# The pacer section's keys and their defaults (config_pacer.py checks the values).
PACER_DEFAULTS: dict[str, Any] = {
    # gamma: upcycle an MLP block whose conflict exceeds it. Measured (benchmarks/quality and
    # issue 15): experts that lose each other's domains when averaged show I = 0.12-0.40
    "interference_threshold": 0.1,
    "top_k_experts": 2,
    "dropout_rate": None,  # PacerKit's key; refused: the dense layers are the mean
    "anchor_strategy": "first",
    "enable_moe_upcycle": True,
    "max_sweeps": 20,  # safety cap: alignment sweeps until converged (measured: 1-2, at worst 7)
    "max_param_growth": None,  # budget mode: stop upcycling at this parameter ratio, e.g. 1.36
    "upcycle_fraction": None,  # budget mode: upcycle this fraction of the MLP blocks
    "max_experts": None,  # cap on the experts per upcycled block (default: the number of models)
    "expert_distance": 1.0,  # join clusters whose average 1 - cos(deviations) is below this
    "router_temperature": 1.0,
    "tome_r": 0,  # ViT-MoE outputs: tokens merged per block at inference (ToMe), 0 = off
    "router_mode": "linear",  # or "deviation_norm": R_m(x) = ||Delta_m x|| (ViT-MoE only)
    "router": None,  # the linear gate's rows: few_shot (from router_samples) or data_free
    "router_samples": None,  # {model: file}: sample lines (text) or images (.npy) per model
    "router_holdout": 0.2,  # share of each model's sample lines held out to measure routing
    "dense": None,  # linear layers not upcycled: regmean (methods/regmean.py, from the
    # router_samples) or mean; default regmean when router_samples are given, else mean
    "regmean_alpha": 0.9,  # RegMean's shrinkage of the Gram matrices' off-diagonal terms
    "vocabulary": None,  # token rows: usage (weighted by the samples' use, methods/vocabulary.py)
    # or mean; default usage when router_samples are given, else mean
    "align": True,
}


@dataclass(frozen=True)
class ModelEntry:
    ref: ModelRef
    # this model's own parameter settings (weight, density, ...), over the plan-level ones;
    # a setting is a scalar or a filter/gradient list (methods/schedule.py)
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def weight(self) -> float | None:
        """The model's own weight when it is one number (None: the plan-level one)."""
        return _scalar(self.parameters.get("weight"))

    @property
    def density(self) -> float | None:
        return _scalar(self.parameters.get("density"))


def _scalar(setting: Any) -> Any:
    return setting if isinstance(setting, (int, float)) and not isinstance(setting, bool) \
        else None


@dataclass(frozen=True)
class OutputSpec:
    path: Path
    save_format: str = "safetensors"
    dtype: str = "auto"
    shard_size: int = 5 * 10**9
    target: str = "transformers"  # one of config_models.TARGETS
    # whose tokenizer and generation files are copied: None (the base model if there is
    # one, else the first model), "base", or one of the models; none if copy_tokenizer is off
    tokenizer_source: ModelRef | str | None = None
    copy_tokenizer: bool = True


@dataclass(frozen=True)
class PlanConfig:
    """A validated plan."""

    project_name: str
    models: tuple[ModelEntry, ...]
    output: OutputSpec
    method: str = "pacer"
    base_model: ModelRef | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    pacer: dict[str, Any] = field(default_factory=lambda: dict(PACER_DEFAULTS))
    seed: int = 0
    source: Path | None = None
    align: bool | str = False  # True, False or "only"
    # config.json keys that may differ between the models (the anchor's values are written)
    accept_config_differences: tuple[str, ...] = ()
    # read from a mergekit configuration (mergekit_yaml.py): what was read as what
    read_as: tuple[str, ...] = ()
    # an output assembled from layer ranges (slices.py); models are then the first slice's
    # merged sources (the base, if any, left out)
    slices: tuple[SliceSpec, ...] = ()
    # where the units run (`backend: ray` or `{name: ray, address: HOST:PORT}`); the
    # command line's --backend / --address win
    backend: str | None = None
    address: str | None = None

    @property
    def anchor_ref(self) -> ModelRef | None:
        """The model named by ``pacer.anchor_strategy``, if it names one."""
        strategy = self.pacer["anchor_strategy"]
        return strategy if isinstance(strategy, ModelRef) else None


# The checks every section shares.
def as_mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise PacerError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def as_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PacerError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value):  # YAML's .nan and .inf are floats too
        raise PacerError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def suggest(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(raw: dict, known: tuple[str, ...], where: str) -> None:
    for key in raw:
        if key not in known:
            raise PacerError(f"{where}: unknown key {key!r}{suggest(key, known)}; "
                             f"known keys: {', '.join(known)}")
