"""Annealing schedules and the straight-through keep mask against hand-computed values."""

import math

import pytest
import torch

from craftvla.errors import ConfigError
from craftvla.prune.gumbel import relaxed_keep, straight_through_keep, temperature_at, topk_columns


def test_temperature_schedules_by_hand():
    assert temperature_at(0, 100) == pytest.approx(1.0)
    assert temperature_at(100, 100) == pytest.approx(0.1)
    assert temperature_at(500, 100) == pytest.approx(0.1)  # held after the end
    assert temperature_at(50, 100) == pytest.approx(math.sqrt(0.1))  # exponential: geometric midpoint
    assert temperature_at(50, 100, schedule="linear") == pytest.approx(0.55)
    assert temperature_at(50, 100, schedule="cosine") == pytest.approx(0.55)
    assert temperature_at(25, 100, schedule="cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    values = [temperature_at(s, 10, 2.0, 0.5) for s in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))
    with pytest.raises(ConfigError, match="schedule"):
        temperature_at(0, 10, schedule="step")


def test_keep_mask_is_exact_topk_forward():
    scores = torch.tensor([[0.3, -1.0, 2.0, 0.5, 0.1], [5.0, 4.0, -3.0, 0.0, 1.0]], requires_grad=True)
    mask = straight_through_keep(scores, 2, tau=0.5, noise=False)
    assert torch.equal(mask.detach(), torch.tensor([[0.0, 0, 1, 1, 0], [1, 1, 0, 0, 0]]))
    assert torch.equal(topk_columns(scores.detach(), 2), torch.tensor([[2, 3], [0, 1]]))


def test_straight_through_gradient_is_the_sigmoid_surrogate():
    scores = torch.tensor([[0.3, -1.0, 2.0, 0.5, 0.1]], requires_grad=True)
    weights = torch.tensor([[1.0, 2.0, -1.0, 0.5, 3.0]])
    tau = 0.25
    (straight_through_keep(scores, 2, tau, noise=False) * weights).sum().backward()
    threshold = (0.5 + 0.3) / 2  # halfway between the 2nd (0.5) and 3rd (0.3) highest
    s = torch.sigmoid((scores.detach() - threshold) / tau)
    expected = weights * s * (1 - s) / tau  # d/dx sigmoid((x - t) / tau), t held fixed
    assert torch.allclose(scores.grad, expected, atol=1e-6)


def test_dropped_tokens_stay_dropped_and_budget_holds():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 10, generator=gen, requires_grad=True)
    alive = torch.zeros(4, 10, dtype=torch.bool)
    alive[:, :6] = True
    mask = straight_through_keep(scores, 3, tau=1.0, noise=True, alive=alive, generator=gen)
    assert torch.equal(mask.detach().sum(1), torch.full((4,), 3.0))
    assert mask.detach()[:, 6:].abs().sum() == 0
    mask.sum().backward()
    assert scores.grad[:, 6:].abs().sum() == 0 and scores.grad[:, :6].abs().sum() > 0
    assert torch.equal(straight_through_keep(scores, 10, tau=1.0), torch.ones(4, 10))
    few = torch.zeros(1, 10, dtype=torch.bool)
    few[0, :2] = True  # fewer tokens alive than the budget: all of them stay
    assert torch.equal(relaxed_keep(scores[:1], 3, 1.0, noise=False, alive=few) > 0.5, few)


def test_noise_changes_the_choice_only_in_training_draws():
    scores = torch.zeros(1, 50)
    draws = {
        tuple(
            straight_through_keep(scores, 5, 1.0, generator=torch.Generator().manual_seed(s)).nonzero()[:, 1].tolist()
        )
        for s in range(5)
    }
    assert len(draws) > 1  # equal scores: the Gumbel noise decides
