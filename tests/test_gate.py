"""The new formulas of the quality work, on hand-computed small cases: the gate fit
(methods/gate.py), the base-free dense rule (methods/dense.py), what a budget buys
(methods/upcycle.py) and the data-free token distributions (calibration.py)."""

import math

import pytest
import torch

from pacer_stream.calibration import held_out_lines
from pacer_stream.methods.consensus import PartStats
from pacer_stream.methods.dense import MethodParams, TensorMerge, median
from pacer_stream.methods.gate import (balanced_cross_entropy, class_weights, discriminant,
                                       fit_gate, fit_scale, routing_accuracy)
from pacer_stream.methods.upcycle import UpcyclePolicy, decide

# two classes on the axes: means (2, 0) and (0, 3), within-class spread ±1 on each axis
U = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
Y = torch.tensor([0, 0, 1, 1])


def test_class_weights_give_every_expert_the_same_total():
    w = class_weights(torch.tensor([0, 0, 0, 1]), 2)
    assert torch.allclose(w, torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expert\(s\) \[2\]"):
        class_weights(torch.tensor([0, 1]), 3)


def test_discriminant_by_hand():
    # means minus their mean (1, 1.5): (1, -1.5) and (-1, 1.5)
    plain, bias = discriminant(U, Y, 2, whiten=False)
    assert torch.allclose(plain, torch.tensor([[1.0, -1.5], [-1.0, 1.5]], dtype=torch.float64))
    assert torch.allclose(bias, torch.tensor([-2.0, -4.5], dtype=torch.float64))  # -|μ_e|²/2
    # pooled covariance diag(0.5, 0.5); shrinking towards 0.5 I leaves it: S^-1 = 2 I
    rows, bias = discriminant(U, Y, 2)
    assert torch.allclose(rows, 2 * plain)
    assert torch.allclose(bias, torch.tensor([-4.0, -9.0], dtype=torch.float64))


def test_the_bias_is_folded_in_through_a_constant_direction():
    # class 0 sits at x = 0, class 1 at x = 1: through the origin no boundary separates
    # them; a third coordinate that is 1 for every token carries the bias
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    x = labels.double() + 0.1 * torch.randn(200, generator=gen, dtype=torch.float64)
    noise = torch.randn(200, generator=gen, dtype=torch.float64)
    without = torch.stack([x, noise], 1)
    assert routing_accuracy(fit_gate(without, labels, 2), without, labels) < 0.8
    with_constant = torch.stack([x, noise, torch.ones(200, dtype=torch.float64)], 1)
    assert routing_accuracy(fit_gate(with_constant, labels, 2), with_constant, labels) > 0.99


def test_whitening_finds_the_direction_class_means_miss():
    # the classes differ by ±1 along x − y, while both coordinates share a noise of
    # spread 10: class means alone point mostly along the noise, the discriminant does not
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(400, generator=gen) * 10
    labels = torch.arange(400) % 2
    sign = labels.float() * 2 - 1
    u = torch.stack([noise + sign, noise], 1)
    u += 0.05 * torch.randn(400, 2, generator=gen)
    assert routing_accuracy(fit_gate(u, labels, 2), u, labels) > 0.95
    assert routing_accuracy(fit_gate(u, labels, 2, whiten=False), u, labels) < 0.75


def test_scale_minimises_the_cross_entropy():
    # overlapping classes: a finite best scale, no better one nearby
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(300) % 3
    u = torch.nn.functional.one_hot(labels, 3).double() + 0.8 * torch.randn(300, 3, generator=gen,
                                                                            dtype=torch.float64)
    raw = u @ discriminant(u, labels, 3)[0].T
    w = class_weights(labels, 3)
    c = fit_scale(raw, labels, w)
    best = balanced_cross_entropy(raw * c, labels, w)
    assert 1e-3 < c < 100
    for factor in (0.8, 1.25):
        assert balanced_cross_entropy(raw * c * factor, labels, w) > best


def test_separable_gate_routes_every_token_and_is_sharp():
    gate = fit_gate(U, Y, 2)
    assert routing_accuracy(gate, U, Y) == 1.0
    probs = torch.softmax(U.double() @ gate.T, 1)
    assert probs[torch.arange(4), Y].min() > 0.99


def test_routing_accuracy_weights_experts_equally():
    gate = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])  # expert 0: 2/2 right, expert 1: 1/2 right
    assert routing_accuracy(gate, u, labels) == pytest.approx(0.75)
    assert math.isnan(routing_accuracy(gate, u[:0], labels[:0]))


def test_held_out_lines_are_evenly_spread():
    assert held_out_lines(10, 0.2) == [False, False, False, False, True] * 2
    assert not any(held_out_lines(7, 0.0))


# -- the base-free dense rule --------------------------------------------------------------

def _merge(method: str, x: torch.Tensor, density: float = 1.0, base=None) -> torch.Tensor:
    params = MethodParams.resolve(method, [{}] * x.shape[0], {"density": density}, 0)
    merge = TensorMerge("t", tuple(x.shape[1:]), params)
    anchor, d = merge.split(x.clone(), base)
    for pass_name in merge.passes:
        merge.observe(pass_name, (0, x.shape[1]), d)
    return merge.merge((0, x.shape[1]), anchor, d)


def test_median_by_hand():
    x = torch.tensor([[1.0, 5.0], [3.0, 2.0], [2.0, 9.0], [10.0, 0.0]])
    assert median(x).tolist() == [2.5, 3.5]  # even N: the mean of the middle two
    assert median(x[:3]).tolist() == [2.0, 5.0]
    assert median(x[:2]).tolist() == [2.0, 3.5]  # N = 2: the mean


def test_base_free_ties_of_two_models_is_their_mean():
    # the first rule returned the element-wise max or min here (a coin-flip election)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 30, generator=gen)
    for density in (1.0, 0.5):
        merged = _merge("ties", x, density)
        assert torch.equal(merged, x.mean(0)) or (merged - x.mean(0)).abs().max() < 1e-6 \
            or density < 1  # at density < 1 the masks of a and b differ only at the threshold
    assert torch.equal(_merge("ties", x, 1.0), x.mean(0))


def test_base_free_ties_keeps_a_lone_change_whole():
    base = torch.randn(20, 10)
    x = base.expand(3, 20, 10).clone()
    x[0, :, :4] += 1.0  # model 0 moved these entries, the others did not
    x[2, :, 8:] -= 0.5  # model 2 moved these
    merged = _merge("ties", x)
    assert torch.allclose(merged[:, :4], base[:, :4] + 1.0)
    assert torch.allclose(merged[:, 8:], base[:, 8:] - 0.5)
    assert torch.equal(merged[:, 4:8], base[:, 4:8])
    # the mean dilutes both changes by 1/3
    assert (x.mean(0)[:, :4] - base[:, :4] - 1 / 3).abs().max() < 1e-6


def test_with_a_base_the_sum_still_elects():
    base = torch.zeros(1, 2)
    x = torch.tensor([[[1.0, -1.0]], [[-3.0, 2.0]]])
    # sums -2 and 1: elect -, +; each kept entry alone: -3 and then the mean of agreeing +2
    assert _merge("ties", x, base=base).tolist() == [[-3.0, 2.0]]


# -- what a parameter budget buys -------------------------------------------------------------

def _stats(models: list[torch.Tensor]) -> PartStats:
    stats = PartStats(len(models))
    stats.add(torch.stack(models))
    return stats


def test_budget_buys_fewer_experts_when_every_model_does_not_fit():
    gen = torch.Generator().manual_seed(3)
    mlp = {}
    for layer in range(4):
        w = torch.randn(32, generator=gen)
        mlp[layer] = _stats([w + 0.5 * torch.randn(32, generator=gen) for _ in range(4)])

    def growth(blocks, m):  # each extra expert of a block costs 0.1
        return 1.0 + 0.1 * len(blocks) * (m - 1)

    ranking = sorted(mlp, key=lambda b: -mlp[b].interference)
    decision = decide(mlp, UpcyclePolicy(max_param_growth=1.25), growth)
    # M = 4 costs 0.3 per block: nothing fits; M = 3 (0.2) buys the most conflicting block,
    # which beats two blocks at M = 2 (0.1 each): more experts before more blocks
    assert decision.num_experts == 3 and decision.blocks == [ranking[0]]
    wide = decide(mlp, UpcyclePolicy(max_param_growth=1.65), growth)
    assert wide.num_experts == 4 and wide.blocks == sorted(ranking[:2])  # 1.6 fits, 1.9 not
    two = decide(mlp, UpcyclePolicy(max_param_growth=1.15), growth)
    assert two.num_experts == 2 and two.blocks == [ranking[0]]  # only M = 2 fits: one block
    cheap = decide(mlp, UpcyclePolicy(max_param_growth=1.05), growth)
    assert not cheap.upcycles
