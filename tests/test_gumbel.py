"""Straight-through Gumbel-softmax (Jang et al. 2017; Bengio et al. 2013)."""
import pytest
import torch

from mmdialog.plugins.bridges.gumbel import gumbel_softmax_st


def test_forward_is_one_hot_of_argmax_without_noise():
    z = torch.randn(3, 5, 11)
    y = gumbel_softmax_st(z, tau=1.0, noise=False, hard=True)
    assert torch.equal(y, torch.nn.functional.one_hot(z.argmax(-1), 11).float())


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_gradient_equals_the_soft_samples(tau):
    z = torch.randn(4, 7, requires_grad=True)
    w = torch.randn(4, 7)
    (gumbel_softmax_st(z, tau=tau, noise=False, hard=True) * w).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (torch.softmax(z2 / tau, -1) * w).sum().backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)
    assert z.grad.abs().sum() > 0


def test_tau_sharpens_the_soft_distribution():
    z = torch.tensor([[2.0, 1.0, 0.0]])
    soft_hot = gumbel_softmax_st(z, tau=4.0, noise=False, hard=False)
    soft_cold = gumbel_softmax_st(z, tau=0.25, noise=False, hard=False)
    assert soft_cold.max() > soft_hot.max()
    assert torch.allclose(soft_hot.sum(-1), torch.ones(1))


def test_noise_samples_other_tokens_and_is_seeded():
    z = torch.zeros(2000, 4)  # uniform logits: only noise decides
    g = torch.Generator().manual_seed(0)
    y = gumbel_softmax_st(z, noise=True, generator=g)
    counts = y.sum(0)
    assert (counts > 400).all()  # every token is drawn ~500 times
    again = gumbel_softmax_st(z, noise=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, again)


def test_soft_mode_returns_a_distribution():
    y = gumbel_softmax_st(torch.randn(5, 9), noise=False, hard=False)
    assert torch.allclose(y.sum(-1), torch.ones(5))
    assert (y < 1).all()
