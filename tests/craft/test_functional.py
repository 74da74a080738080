"""CRaFT pure functions against hand-computed cases and the explicit two-stage reference."""

import math

import pytest
import torch

from benchmarks.craft_step.reference import project_gradients_reference
from craftvla.craft import functional as CF
from craftvla.errors import CraftVLAError


def test_retention_loss_is_mse_and_detaches_anchor():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    anchor = torch.tensor([[1.0, 0.0], [0.0, 4.0]], requires_grad=True)
    loss = CF.retention_loss(f, anchor)
    assert loss.item() == pytest.approx((0 + 4 + 9 + 0) / 4)
    loss.backward()
    assert anchor.grad is None and f.grad is not None
    with pytest.raises(CraftVLAError, match="shape"):
        CF.retention_loss(f, anchor[:, :1])


def test_surgery_conflicting_hand_case():
    # <(1,0), (-1,1)> = -1 < 0: g_act -> (1,0) + 1/2 (-1,1) = (0.5, 0.5); + 1 * g_ret = (-0.5, 1.5)
    g_act, g_ret = [torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])]
    stats = CF.project_gradients(g_act, g_ret, lam=1.0, eps=0.0)
    assert torch.equal(g_act[0], torch.tensor([-0.5, 1.5]))
    assert stats["beta"].item() == pytest.approx(1.5)
    assert stats["conflict"].item() == 1.0 and stats["dot"].item() == -1.0
    assert stats["cos"].item() == pytest.approx(-1 / math.sqrt(2))


def test_surgery_non_conflicting_hand_case():
    # <(1,2), (3,0)> = 3 >= 0: no projection; g = (1,2) + 0.5 * (3,0) = (2.5, 2)
    g_act, g_ret = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 0.0])]
    stats = CF.project_gradients(g_act, g_ret, lam=0.5, eps=0.0)
    assert torch.equal(g_act[0], torch.tensor([2.5, 2.0]))
    assert stats["beta"].item() == 0.5 and stats["conflict"].item() == 0.0


def test_projection_off_is_plain_weighted_sum():
    g_act, g_ret = [torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])]
    CF.project_gradients(g_act, g_ret, lam=2.0, eps=0.0, enable_projection=False)
    assert torch.equal(g_act[0], torch.tensor([-1.0, 2.0]))


def test_per_tensor_vs_global_hand_case():
    # tensor 1 conflicts (dot -1), tensor 2 agrees (dot 2); globally the dot is +1.
    def grads():
        return ([torch.tensor([1.0, 0.0]), torch.tensor([2.0])], [torch.tensor([-1.0, 1.0]), torch.tensor([1.0])])

    a, r = grads()
    st = CF.project_gradients(a, r, lam=1.0, eps=0.0, scope="per_tensor")
    assert torch.equal(a[0], torch.tensor([-0.5, 1.5])) and torch.equal(a[1], torch.tensor([3.0]))
    assert st["conflict"].item() == 0.5 and st["beta"].item() == pytest.approx((1.5 + 1.0) / 2)
    a, r = grads()
    st = CF.project_gradients(a, r, lam=1.0, eps=0.0, scope="global")
    assert torch.equal(a[0], torch.tensor([0.0, 1.0])) and torch.equal(a[1], torch.tensor([3.0]))
    assert st["conflict"].item() == 0.0 and st["dot"].item() == 1.0


def _random_grads(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7,), (2, 4, 3), (1,)]
    a = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    # retention gradient anti-correlated with the action one so that conflicts actually occur
    r = [-0.7 * x + 0.5 * torch.randn(x.shape, generator=g, dtype=torch.float64) for x in a]
    return a, r


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("seed", range(4))
def test_beta_form_equals_explicit_projection(scope, seed):
    a, r = _random_grads(seed)
    expected = project_gradients_reference(a, r, lam=0.3, eps=1e-8, scope=scope)
    stats = CF.project_gradients(a, r, lam=0.3, eps=1e-8, scope=scope)
    for got, want in zip(a, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if scope == "global":
        assert stats["conflict"].item() == 1.0  # anti-correlated by construction


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_project_flat_equals_list_form(scope):
    a, r = _random_grads(7)
    flat_a = torch.cat([x.flatten() for x in a]).float()
    flat_r = torch.cat([x.flatten() for x in r]).float()
    lengths = torch.tensor([x.numel() for x in a]) if scope == "per_tensor" else None
    CF.project_flat(flat_a, flat_r, torch.tensor(0.3), 1e-8, lengths)
    expected = project_gradients_reference(a, r, lam=0.3, scope=scope)
    torch.testing.assert_close(flat_a, torch.cat([x.flatten() for x in expected]).float())


def test_dual_update_sequence():
    lam, seq = 1.0, []
    for l_ret in [0.3, 0.1, 0.0, 0.0]:
        lam = CF.dual_update(lam, l_ret, budget=0.1, lr=0.5)
        seq.append(lam)
    assert seq == pytest.approx([1.1, 1.1, 1.05, 1.0])
    assert CF.dual_update(0.02, 0.0, budget=0.1, lr=1.0) == 0.0  # clamped at zero
    t = CF.dual_update(torch.tensor(0.02), torch.tensor(0.5), budget=0.1, lr=1.0)
    assert isinstance(t, torch.Tensor) and t.item() == pytest.approx(0.42)


def test_relative_dual_update_measures_the_violation_in_budgets():
    # L_ret = 3 budgets: +2 x lr; at the budget: no change; L_ret = 0: -1 x lr, the same for every budget
    for budget in (0.01, 0.1, 1.0):
        assert CF.dual_update(1.0, 3 * budget, budget, lr=0.1, relative=True) == pytest.approx(1.2)
        assert CF.dual_update(1.0, budget, budget, lr=0.1, relative=True) == pytest.approx(1.0)
        assert CF.dual_update(1.0, 0.0, budget, lr=0.1, relative=True) == pytest.approx(0.9)
    assert CF.dual_update(0.05, 0.0, 0.1, lr=0.1, relative=True) == 0.0  # clamped at zero
    t = CF.dual_update(torch.tensor(1.0), torch.tensor(0.05), budget=0.1, lr=0.1, relative=True)
    assert isinstance(t, torch.Tensor) and t.item() == pytest.approx(0.95)
