"""Coordinate descent over one unit's symmetry groups (one peer against the anchor).

Given the residual-stream permutation of the current sweep, a block's local
groups (MLP units, KV heads, query heads, V/O dims, ...) only interact with each
other, so they are solved in turn, in a seeded random order, until a full round
changes nothing. Every assignment goes through :mod:`.lap`, which tries the
row-max certificate before any solver: same-base fine-tunes cost one cost matrix
per group and no LAP at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..graph import GLOBAL, MergeGraph
from .cost import apply_solution, children, cost_inputs, group_cost
from .lap import maximize_assignment, maximize_assignments

MAX_ROUNDS = 8  # rounds of a block's groups; exact recoveries settle in two


@dataclass
class KindStats:
    """Per group kind, for the report: how much moved, and what solving cost."""

    problems: int = 0  # assignment problems posed (all sweeps)
    certified: int = 0  # of which the row-max certificate settled
    slots: int = 0  # permuted positions in total
    moved: int = 0  # of which not at their own index (final permutations)
    seconds: float = 0.0  # solver time, all sweeps

    def as_dict(self) -> dict:
        return {"problems": self.problems, "certified": self.certified,
                "moved_fraction": self.moved / self.slots if self.slots else 0.0,
                "solver_seconds": round(self.seconds, 4)}


@dataclass
class PeerStats:
    kinds: dict[str, KindStats] = field(default_factory=dict)
    rounds: int = 0

    def kind(self, name: str) -> KindStats:
        return self.kinds.setdefault(name, KindStats())


def solve(cost: torch.Tensor, stats: KindStats) -> torch.Tensor:
    """Best ``cols`` ([problems, n]) for a ``[problems, n, n]`` cost; records statistics."""
    start = time.perf_counter()
    if cost.shape[0] == 1:
        found = [maximize_assignment(cost[0])]
    else:
        found = maximize_assignments(cost)
    stats.seconds += time.perf_counter() - start
    stats.problems += len(found)
    stats.certified += sum(a.certified for a in found)
    return torch.stack([torch.as_tensor(a.cols, dtype=torch.long) for a in found])


def local_groups(graph: MergeGraph, unit: str) -> list[str]:
    return sorted(gid for gid, g in graph.groups.items() if g.unit == unit and g.kind != GLOBAL)


def align_unit(graph: MergeGraph, unit: str, anchor: dict[str, torch.Tensor],
               peer: dict[str, torch.Tensor], perms: dict[str, torch.Tensor],
               generator: torch.Generator, stats: PeerStats) -> None:
    """Solve the unit's local groups in ``perms`` (in place) given everything else.

    A group is solved again only when a group its cost reads has changed since its
    last solve (the MLP group, 28672 wide at 70B, reads none of the attention
    groups): the same result as re-solving everything every round, for less work.
    """
    gids = local_groups(graph, unit)
    inputs = {gid: cost_inputs(graph, graph.groups[gid]) for gid in gids}
    stale = set(gids)
    for _ in range(MAX_ROUNDS):
        stats.rounds += 1
        changed = False
        for k in torch.randperm(len(gids), generator=generator).tolist():
            gid = gids[k]
            if gid not in stale:
                continue
            stale.discard(gid)
            group = graph.groups[gid]
            cols = solve(group_cost(graph, gid, anchor, peer, perms), stats.kind(group.kind))
            if not torch.equal(cols, perms[gid].reshape(group.problems, group.size).cpu()):
                apply_solution(graph, gid, perms, cols)  # moves its children's slots too
                moved = {gid} | {child.id for child in children(graph, group)}
                stale |= {other for other in gids if inputs[other] & moved}
                changed = True
        if not changed:
            return


def residual_cost(graph: MergeGraph, anchor: dict[str, torch.Tensor],
                  peer: dict[str, torch.Tensor], perms: dict[str, torch.Tensor]) -> torch.Tensor:
    """This unit's ``[d, d]`` share of the residual stream's cost (0 if it has no member)."""
    return group_cost(graph, GLOBAL, anchor, peer, perms)[0]


def count_moved(graph: MergeGraph, perms: dict[str, torch.Tensor], stats: PeerStats) -> None:
    """Fraction of permuted slots per group kind, from the final permutations."""
    for kind in stats.kinds.values():
        kind.slots = kind.moved = 0
    for gid, perm in perms.items():
        group = graph.groups[gid]
        identity = torch.arange(group.size, device=perm.device)
        kind = stats.kind(group.kind)
        kind.slots += perm.numel()
        kind.moved += int((perm != identity).sum())
