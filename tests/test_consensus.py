"""Interference metrics, clustering and the upcycling policy, on controlled inputs."""

from __future__ import annotations

import math

import pytest
import torch

from pacer_stream.methods.consensus import PartStats, model_similarity
from pacer_stream.methods.upcycle import Decision, UpcyclePolicy, cluster, decide, router_rows


def stats_of(models: list[torch.Tensor], base: torch.Tensor | None = None,
             slices: int = 1) -> PartStats:
    """PartStats accumulated from whole tensors, optionally in row slices."""
    x = torch.stack(models)
    stats = PartStats(len(models))
    for rows in torch.arange(x.shape[1]).chunk(slices):
        stats.add(x[:, rows], None if base is None else base[rows])
    return stats


def test_identical_models_have_zero_interference():
    w = torch.randn(32, 16)
    stats = stats_of([w, w.clone(), w.clone()])
    assert stats.interference == 0.0
    assert stats.distances() == [0.0, 0.0, 0.0]


def test_interference_grows_monotonically_with_injected_conflict():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=gen)
    noise = [torch.randn(64, 32, generator=gen) for _ in range(3)]
    values = [stats_of([w + t * n for n in noise]).interference
              for t in (0.0, 0.01, 0.1, 0.3, 1.0, 3.0)]
    assert values[0] == 0.0
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[-1] < 1.0


def test_interference_is_scale_free_and_slicing_invariant():
    gen = torch.Generator().manual_seed(1)
    models = [torch.randn(40, 8, generator=gen) for _ in range(4)]
    whole = stats_of(models)
    assert stats_of(models, slices=5).interference == pytest.approx(whole.interference, rel=1e-12)
    scaled = stats_of([10.0 * m for m in models])
    assert scaled.interference == pytest.approx(whole.interference, rel=1e-9)


def test_metric_matches_its_formula():
    gen = torch.Generator().manual_seed(2)
    models = [torch.randn(50, generator=gen) + 2.0 for _ in range(3)]
    x = torch.stack(models).double()
    c = x.mean(0)
    expected = math.sqrt(((x - c) ** 2).sum(1).mean() / (x ** 2).sum(1).mean())
    assert stats_of(models).interference == pytest.approx(expected, rel=1e-9)


def test_base_free_metric_is_not_the_seeds_constant():
    """The seed's 1 - |sum D| / sum |D| is 1 for every block; ours must vary across blocks."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(32, 32, generator=gen)
    blocks = [stats_of([w + s * torch.randn(32, 32, generator=gen) for _ in range(3)])
              for s in (0.01, 0.2, 1.0)]
    values = [b.interference for b in blocks]
    assert len({round(v, 6) for v in values}) == 3
    # the seed's formula on deviations from the mean is always 1 (what we must not use)
    x = torch.stack([w + torch.randn(32, 32, generator=gen) for _ in range(3)])
    d = x - x.mean(0)
    assert 1 - d.sum(0).norm() / d.norm(dim=(1, 2)).sum() == pytest.approx(1.0, abs=1e-6)


def test_base_interference_is_the_seed_formula_on_task_vectors():
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(30, 10, generator=gen)
    tau = [torch.randn(30, 10, generator=gen) for _ in range(3)]
    stats = stats_of([base + t for t in tau], base=base, slices=3)
    expected = 1 - torch.stack(tau).sum(0).norm() / sum(t.norm() for t in tau)
    assert stats.base_interference == pytest.approx(float(expected), rel=1e-6)
    same = stats_of([base + tau[0]] * 3, base=base)
    assert same.base_interference == pytest.approx(0.0, abs=1e-9)
    assert same.metric() == same.base_interference


def test_model_similarity_matches_direct_cosines():
    gen = torch.Generator().manual_seed(5)
    models = [torch.randn(20, 6, generator=gen) for _ in range(3)]
    sim = model_similarity([stats_of(models, slices=2)])
    flat = [m.reshape(-1).double() for m in models]
    for i in range(3):
        for j in range(3):
            direct = float(flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm()))
            assert sim[i][j] == pytest.approx(direct, abs=1e-9)


def test_cluster_groups_models_by_deviation_direction():
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(64, generator=gen)
    a, b = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    models = [w + a, w + a + 0.01 * torch.randn(64, generator=gen), w + b,
              w + b + 0.01 * torch.randn(64, generator=gen)]
    cos = stats_of(models).deviation_cosines()
    assert cluster(cos, distance=1.0) == [0, 0, 1, 1]
    assert cluster(cos, count=2) == [0, 0, 1, 1]
    assert len(set(cluster(cos, count=3))) == 3
    assert cluster(cos, count=1) == [0, 0, 0, 0]


def _mlp(values: list[float]) -> dict[int, PartStats]:
    """Blocks whose three models deviate with relative size ``values[layer]``."""
    gen = torch.Generator().manual_seed(7)
    out = {}
    for layer, size in enumerate(values):
        w = torch.randn(16, 16, generator=gen)
        out[layer] = stats_of([w + size * torch.randn(16, 16, generator=gen) for _ in range(3)])
    return out


def test_threshold_mode_upcycles_the_blocks_over_gamma():
    mlp = _mlp([0.01, 2.0, 0.02, 1.0])
    decision = decide(mlp, UpcyclePolicy(threshold=0.35, top_k=2), lambda b, m: 1.0)
    assert decision.ranking[:2] == [1, 3]
    assert decision.blocks == [1, 3]
    assert decision.num_experts == 3 and decision.top_k == 2
    assert all(sorted(set(labels)) == [0, 1, 2] for labels in decision.clusters.values())
    assert Decision.from_json(decision.to_json()) == decision


def test_budget_mode_picks_most_conflicting_and_respects_the_cap():
    mlp = _mlp([0.3, 2.0, 0.01, 0.9, 0.1])
    per_block = 0.1  # growth per upcycled block with M experts: (M - 1) * 0.05

    def growth(blocks, m):
        return 1.0 + len(blocks) * (m - 1) * per_block / 2

    for cap in (1.0, 1.09, 1.1, 1.25, 1.31, 2.0):
        decision = decide(mlp, UpcyclePolicy(max_param_growth=cap), growth)
        assert growth(decision.blocks, decision.num_experts) <= cap
        assert decision.blocks == sorted(decision.ranking[:len(decision.blocks)])
        more = decision.ranking[:len(decision.blocks) + 1]
        assert len(more) == len(decision.blocks) or growth(more, 3) > cap
    assert decide(mlp, UpcyclePolicy(upcycle_fraction=0.4), growth).blocks == [1, 3]


def test_identical_blocks_are_never_upcycled_in_budget_mode():
    w = torch.randn(8, 8)
    mlp = {0: stats_of([w, w, w]), 1: stats_of([w, w, w])}
    decision = decide(mlp, UpcyclePolicy(upcycle_fraction=1.0), lambda b, m: 1.0)
    assert not decision.upcycles and decision.note


def test_router_rows_are_unit_prototypes_over_temperature():
    sums = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.float64)
    rows = router_rows(sums, temperature=0.5)
    assert torch.allclose(rows, torch.tensor([[1.2, 1.6], [0.0, 2.0]]))
