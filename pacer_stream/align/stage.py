"""The align stage: sweeps over the units that re-base every peer onto the anchor.

One sweep is one streaming pass over the units. For each unit and peer: solve
the unit's local groups given the current residual permutation
(:func:`.matcher.align_unit`), then add the unit's share of the residual-stream
cost to that peer's d × d accumulator (fp64). At the end of the sweep each
peer's residual assignment is solved; sweeps repeat until no peer's residual
permutation changes (converged). ``max_sweeps`` is a safety net against a
descent that cycles, not the usual stop: fine-tunes of one base converge after
1 sweep, a permuted copy after 2, and the hardest tiny cases measured (a
permuted copy plus noise as large as the weights) after up to 7. A peer
stopped by the cap is recorded as ``converged: false`` with the cap beside it,
so the CLI can say so.

Peers are aligned in chunks sized so their accumulators fit the memory budget,
so N peers never need N accumulators in RAM. Progress is checkpointed into the
RunState (zarr): the permutations, the accumulators and the position in the
sweep, written into the idle one of two slots and then made current by one
atomic attribute write. A killed run resumes mid-sweep with exactly the state it
had, so it finds the same permutations.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import zarr

from .. import accounting as acct
from .. import failpoints
from ..errors import PacerError
from ..graph import GLOBAL, MergeGraph
from ..seeding import generator
from ..sizes import at_least, format_size
from .cost import inner_product
from .matcher import (KindStats, PeerStats, align_unit, count_moved, local_groups,
                      residual_cost, solve)

# (model index, tensor name) -> the tensor on the device, in its own dtype (costs convert
# one tensor at a time to fp32, so a unit is held at its stored size)
Reader = Callable[[int, str], torch.Tensor]
# Checkpoint when this many times the last checkpoint's cost has passed: every unit
# for small models, rarely for 70B-class accumulators (at most ~10% overhead).
CHECKPOINT_RATIO = 10


class UnitTensors(Mapping):
    """One model's tensors of a unit, read when used and not kept.

    A group's cost needs only its members, one at a time, so holding a whole
    70B-class block (1.7 GB per model) would only crowd out the cost matrix. Repeated
    reads of a block within a sweep come from the page cache.
    """

    def __init__(self, read: Reader, model: int, names: list[str]) -> None:
        self._read, self._model, self._names = read, model, names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._read(self._model, name)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass
class Progress:
    chunk: int = 0
    sweep: int = 0
    next_unit: int = 0


class AlignStage:
    """Finds, for every peer, the permutations that best match it to the anchor."""

    def __init__(self, graph: MergeGraph, labels: list[str], anchor: int, read: Reader,
                 store: zarr.Group, budget: int, seed: int, max_sweeps: int,
                 on_unit: Callable[[], None] = lambda: None,
                 map_units: UnitMap | None = None) -> None:
        self.graph, self.labels, self.anchor, self.read = graph, labels, anchor, read
        self.store, self.seed, self.max_sweeps = store, seed, max_sweeps
        self.on_unit = on_unit
        self.map_units = map_units or self._map_here
        self.peers = [k for k in range(len(labels)) if k != anchor]
        self.units = [u for u in graph.units if u.tensors]
        self.d = graph.groups[GLOBAL].size
        unit_need = max(acct.align_unit_need(graph, u) for u in self.units)
        self.chunk_size = peers_per_pass(self.d, unit_need, budget, len(self.peers))
        self.layout = sorted(graph.groups)
        self._last_save, self._save_cost = 0.0, 0.0

    @property
    def chunks(self) -> list[list[int]]:
        c = self.chunk_size
        return [self.peers[i:i + c] for i in range(0, len(self.peers), c)]

    # -- the sweeps --------------------------------------------------------------------

    def run(self) -> dict[int, dict[str, torch.Tensor]]:
        """Align every peer (resuming where a previous run stopped); perms by model index."""
        progress, perms, acc, info = self._load()
        chunks = self.chunks
        while progress.chunk < len(chunks):
            chunk = chunks[progress.chunk]
            for p in chunk:
                perms.setdefault(p, self.graph.identity_perms())
                acc.setdefault(p, torch.zeros(self.d, self.d, dtype=torch.float64))
                info.setdefault(p, _new_info())
            while progress.sweep < self.max_sweeps and not all(info[p]["converged"] for p in chunk):
                self._sweep(chunk, progress, perms, acc, info)
                self._finish_sweep(chunk, progress, perms, acc, info)
            for p in chunk:
                self._save_final(p, perms.pop(p), info.pop(p))
                acc.pop(p)
            progress = Progress(progress.chunk + 1)
            self._checkpoint(progress, perms, acc, info, force=True)
        return {p: self._load_final(p) for p in self.peers}

    def _sweep(self, chunk: list[int], progress: Progress, perms, acc, info) -> None:
        """One pass over the units still to do in this sweep: each unit's share mapped (here,
        or one task a unit on a cluster), folded in unit order, so the sums and the
        checkpoints are the same wherever the units ran."""
        active = [p for p in chunk if not info[p]["converged"]]
        units = [u.name for u in self.units[progress.next_unit:]]
        sweep = Sweep(self.labels, self.anchor, self.seed, progress.sweep,
                      {p: perms[p] for p in active})
        for ui, shares in enumerate(self.map_units(sweep, units), start=progress.next_unit):
            for p in active:
                share = shares[p]
                perms[p].update(share.perms)
                record = info[p]
                if share.before is not None:
                    record["objective_before"] += share.before
                record["rounds"] += share.rounds
                _add_kinds(record, share.kinds)
                record["objective"] += share.objective
                acc[p] += share.residual
            progress.next_unit = ui + 1
            failpoints.hit("align-unit")
            self._checkpoint(progress, perms, acc, info)
            self.on_unit()

    def _map_here(self, sweep: "Sweep", units: list[str]):
        for unit in units:
            yield unit_shares(self.graph, self.read, sweep, unit)

    def _finish_sweep(self, chunk: list[int], progress: Progress, perms, acc, info) -> None:
        for p in chunk:
            if info[p]["converged"]:
                continue
            stats = PeerStats(_kinds(info[p]))
            cols = solve(acc[p].float().unsqueeze(0), stats.kind(GLOBAL))[0]
            _store_kinds(info[p], stats)
            unchanged = torch.equal(cols, perms[p][GLOBAL].cpu())
            info[p]["sweeps"] += 1
            info[p]["objective_by_sweep"].append(info[p]["objective"])
            info[p]["residual_moved_by_sweep"].append(
                int((cols != torch.arange(self.d)).sum()))
            info[p]["converged"] = unchanged
            perms[p][GLOBAL] = cols.to(perms[p][GLOBAL].device)
            info[p]["objective"] = 0.0
            acc[p].zero_()
        progress.sweep += 1
        progress.next_unit = 0
        self._checkpoint(progress, perms, acc, info, force=True)

    # -- the store ---------------------------------------------------------------------

    def _checkpoint(self, progress: Progress, perms, acc, info, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_save < CHECKPOINT_RATIO * self._save_cost:
            return
        current = int(self.store.attrs.get("current", 1))
        slot = f"slot{1 - current}"
        for p, groups in perms.items():
            self._put(f"{slot}/p{p}/perms", self._pack(groups))
            self._put(f"{slot}/p{p}/acc", acc[p].numpy())
        self.store.attrs.update({  # one atomic write makes the slot current
            "current": 1 - current,
            f"slot{1 - current}": {"chunk": progress.chunk, "sweep": progress.sweep,
                                   "next_unit": progress.next_unit,
                                   "peers": {str(p): info[p] for p in perms}}})
        self._last_save = time.perf_counter()
        self._save_cost = self._last_save - now

    def _load(self):
        current = self.store.attrs.get("current")
        if current is None:
            return Progress(), {}, {}, {}
        slot = f"slot{current}"
        saved = self.store.attrs[slot]
        progress = Progress(saved["chunk"], saved["sweep"], saved["next_unit"])
        perms, acc, info = {}, {}, {}
        for key, record in saved["peers"].items():
            p = int(key)
            perms[p] = self._unpack(self.store[f"{slot}/p{p}/perms"][...])
            acc[p] = torch.from_numpy(np.array(self.store[f"{slot}/p{p}/acc"][...]))
            info[p] = record
        return progress, perms, acc, info

    def _save_final(self, p: int, groups: dict[str, torch.Tensor], record: dict) -> None:
        count_stats = PeerStats(_kinds(record))
        count_moved(self.graph, groups, count_stats)
        _store_kinds(record, count_stats)
        record["objective_after"] = (record["objective_by_sweep"] or [record["objective_before"]])[-1]
        record["max_sweeps"] = self.max_sweeps  # beside "converged": false, the cap that stopped it
        self._put(f"final/p{p}", self._pack(groups))
        self.store.attrs[f"final/p{p}"] = record

    def _load_final(self, p: int) -> dict[str, torch.Tensor]:
        return self._unpack(self.store[f"final/p{p}"][...])

    def report(self) -> dict:
        """Per peer: sweeps, whether it converged (and the cap), objective before/after, per
        group kind what moved and solving cost."""
        out = {}
        for p in self.peers:
            record = dict(self.store.attrs.get(f"final/p{p}", {}))
            out[self.labels[p]] = record
        return out

    def _put(self, path: str, values: np.ndarray) -> None:
        array = self.store.create_array(path, shape=values.shape, dtype=values.dtype,
                                        chunks=values.shape or None, overwrite=True)
        array[...] = values

    def _pack(self, groups: dict[str, torch.Tensor]) -> np.ndarray:
        return np.concatenate([groups[g].reshape(-1).cpu().numpy() for g in self.layout])

    def _unpack(self, flat: np.ndarray) -> dict[str, torch.Tensor]:
        out, at = {}, 0
        for gid in self.layout:
            g = self.graph.groups[gid]
            size = g.problems * g.size
            out[gid] = torch.from_numpy(np.array(flat[at:at + size])).reshape(*g.batch, g.size)
            at += size
        return out


@dataclass
class Sweep:
    """What every unit of one sweep is aligned with: the peers still moving and their
    permutations as the sweep began (a unit changes only its own groups')."""

    labels: list[str]
    anchor: int
    seed: int
    number: int
    perms: dict[int, dict[str, torch.Tensor]]


@dataclass
class UnitShare:
    """One unit's share of a sweep for one peer."""

    perms: dict[str, torch.Tensor]  # the unit's local groups, solved
    before: float | None  # the unpermuted objective (first sweep only)
    objective: float
    residual: torch.Tensor  # fp64 [d, d]: the unit's share of the residual cost
    rounds: int
    kinds: dict[str, dict]


def unit_shares(graph: MergeGraph, read: Reader, sweep: Sweep, unit: str) -> dict[int, UnitShare]:
    """Align one unit's local groups of every moving peer, given the residual permutation,
    and its share of the objective and the residual cost. Depends on nothing but the
    unit's tensors and ``sweep``: the same answer in any process."""
    names = next(u for u in graph.units if u.name == unit).tensors
    anchor = UnitTensors(read, sweep.anchor, names)
    out = {}
    for p, given in sweep.perms.items():
        perms = dict(given)
        peer = UnitTensors(read, p, names)
        before = None
        if sweep.number == 0:  # unpermuted: no permutation given, no copies made
            before = inner_product(graph, anchor, peer, {})
        stats = PeerStats({})
        gen = generator(sweep.seed, "align", sweep.labels[p], unit, sweep.number)
        align_unit(graph, unit, anchor, peer, perms, gen, stats)
        # nothing moved yet (fine-tunes of one base): the same sum as before's
        objective = before if before is not None and _identity(perms) \
            else inner_product(graph, anchor, peer, perms)
        residual = residual_cost(graph, anchor, peer, perms).double().cpu()
        local = {gid: perms[gid] for gid in local_groups(graph, unit)}
        record: dict = {"kinds": {}}
        _store_kinds(record, stats)
        out[p] = UnitShare(local, before, objective, residual, stats.rounds, record["kinds"])
        del peer
    return out


# how the sweeps get every unit's shares, in unit order (AlignStage._map_here, or a backend)
UnitMap = Callable[[Sweep, list[str]], Iterator[dict[int, UnitShare]]]


def _add_kinds(record: dict, kinds: dict[str, dict]) -> None:
    for kind, add in kinds.items():
        into = record["kinds"].setdefault(kind, {"problems": 0, "certified": 0, "slots": 0,
                                                 "moved": 0, "seconds": 0.0})
        for key, value in add.items():
            into[key] += value


def peers_per_pass(d: int, unit_need: int, budget: int, peers: int) -> int:
    """How many peers' residual accumulators fit beside one unit's working set.

    The planner's alignment figure is :func:`.accounting.align_bytes` with one peer, so
    a plan that fits never gets here with too small a budget."""
    fit = acct.peers_that_fit(unit_need, d, budget)
    if fit < 1:
        need = acct.budget_for(acct.align_bytes(unit_need, d, 1))
        raise PacerError(f"alignment (one unit and one {d}x{d} residual accumulator) does not "
                         f"fit the budget of {format_size(budget)}; {at_least(need)}")
    return max(1, min(peers, fit))


def _new_info() -> dict:
    return {"converged": False, "sweeps": 0, "rounds": 0, "objective_before": 0.0,
            "objective": 0.0, "objective_by_sweep": [], "residual_moved_by_sweep": [],
            "kinds": {}}


def _kinds(record: dict) -> dict[str, KindStats]:
    return {k: KindStats(v["problems"], v["certified"], v["slots"], v["moved"], v["seconds"])
            for k, v in record["kinds"].items()}


def _store_kinds(record: dict, stats: PeerStats) -> None:
    record["kinds"] = {k: {"problems": s.problems, "certified": s.certified, "slots": s.slots,
                           "moved": s.moved, "seconds": s.seconds}
                       for k, s in stats.kinds.items()}


def _identity(perms: dict[str, torch.Tensor]) -> bool:
    """Whether every group's permutation is the identity."""
    return all(torch.equal(p, torch.arange(p.shape[-1], device=p.device).expand_as(p))
               for p in perms.values())
