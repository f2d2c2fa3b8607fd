"""The vocabulary of an architecture spec.

A family is described as data (see ``families.py``): named sizes read from
``config.json`` (``dims``), the kinds of symmetry group it has (``groups``) and a
rule per tensor template. Each rule labels every axis of the tensor with the
factors its index decomposes into, major to minor, separated by dots:

* ``"residual"``  the axis is the residual stream (one permutation for the whole net);
* ``"kv.q.rot"``  the axis is (KV head, query head within the group, rotary dim):
  index = (kv * r + q) * head_dim + rot; ``kv`` and ``q`` permute, ``rot`` does not;
* ``"-"``         the axis is never permuted (vocabulary rows, classifier outputs).

A factor that names a group kind permutes; any other name is a fixed dimension.
A child group (``q`` inside ``kv``) is permuted separately within each parent
slot, so it may only appear in an axis after its parent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from ..errors import PacerError

UNIT_KINDS = ("embed", "block", "head")


@dataclass(frozen=True)
class GroupKind:
    """A kind of symmetry group, e.g. ``kv`` (KV heads of one block)."""

    name: str
    size_dim: str  # the dim that gives its size
    scope: str = "block"  # "global" (one for the whole net) or "block" (one per block)
    parent: str | None = None  # permuted within each slot of this group


@dataclass(frozen=True)
class TensorRule:
    """One tensor template: ``{i}`` is the block index, ``{e}`` an expert index (any one:
    every expert of a block matches the same rule)."""

    template: str
    role: str
    axes: tuple[str, ...]
    unit: str = "block"
    optional: bool = False

    def factors(self, axis: int) -> list[str]:
        return self.axes[axis].split(".")


@dataclass(frozen=True)
class ArchSpec:
    """Everything the engine knows about one model family."""

    family: str
    model_types: tuple[str, ...]
    dims: Callable[[dict], dict[str, int]]  # config.json -> named sizes (incl. "layers")
    groups: tuple[GroupKind, ...]
    rules: tuple[TensorRule, ...]
    passthrough: tuple[TensorRule, ...] = ()  # copied from the anchor, must be equal
    prefix: str = ""  # regex for an optional leading prefix, e.g. r"(?:bert\.)?"
    has_rope: bool = False
    # What the engine cannot do for this family, as a phrase saying why ("": it can):
    no_align: str = ""  # some symmetry has no exact rule here (fused tensors): align refused
    no_samples: str = ""  # runtime/blocks.py has no forward pass: router_samples refused
    no_pacer: str = ""  # method pacer refused altogether (MoE inputs: it upcycles dense MLPs)
    _compiled: list = field(default_factory=list, compare=False, repr=False)

    def check_plan(self, method: str, align: bool | str, pacer: dict) -> None:
        """Refuse, before any work, a plan that needs what this family cannot do.

        Alignment (``align: true/only``, on by default for PACER) needs an exact rule for
        every symmetry; sample lines (``router_samples``: RegMean, calibration) need the
        block-wise forward pass. (``router: data_free`` on a family that cannot write its own
        samples merges dense and says so in the report: no stage runs the blocks.)
        """
        if self.no_pacer and method == "pacer":
            raise PacerError(f"{self.family}: {self.no_pacer}; use a plain method (linear, "
                             "ties, ...)")
        if self.no_align and align:
            default = " (method pacer aligns by default)" if method == "pacer" else ""
            raise PacerError(f"{self.family}: {self.no_align}; set align: false{default}")
        if self.no_samples and method == "pacer" and pacer.get("router_samples"):
            raise PacerError(f"{self.family}: {self.no_samples}, so method pacer with "
                             "router_samples is refused; drop them, or use a plain method")

    def group_kind(self, name: str) -> GroupKind | None:
        return next((g for g in self.groups if g.name == name), None)

    def match(self, name: str) -> tuple[TensorRule, int | None, bool] | None:
        """The rule a tensor name matches: (rule, block index or None, is_passthrough)."""
        if not self._compiled:
            for passthrough, rules in ((False, self.rules), (True, self.passthrough)):
                for rule in rules:
                    pattern = re.escape(rule.template).replace(r"\{i\}", r"(\d+)") \
                        .replace(r"\{e\}", r"\d+")
                    self._compiled.append((re.compile(self.prefix + pattern + "$"), rule, passthrough))
        for regex, rule, passthrough in self._compiled:
            found = regex.match(name)
            if found:
                block = int(found.group(1)) if "{i}" in rule.template else None
                return rule, block, passthrough
        return None

    def check(self) -> None:
        """Validate the spec itself (run by the tests for every family)."""
        kinds = {g.name for g in self.groups}
        for g in self.groups:
            assert g.parent is None or g.parent in kinds, f"{self.family}: {g.name} parent"
        for rule in (*self.rules, *self.passthrough):
            assert rule.unit in UNIT_KINDS, f"{self.family}: {rule.template} unit {rule.unit}"
            assert ("{i}" in rule.template) == (rule.unit == "block"), rule.template
            for axis in rule.axes:
                seen: list[str] = []
                for factor in axis.split("."):
                    kind = self.group_kind(factor)
                    if kind is not None and kind.parent is not None:
                        assert kind.parent in seen, f"{self.family}: {rule.template} {axis}"
                    seen.append(factor)
