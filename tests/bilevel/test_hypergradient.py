"""Hypergradients against closed forms (quadratic bilevel toy) and against each other on a tiny LoRA Llama."""

import pytest
import torch

from boost_lightning.bench.batches import random_batch
from boost_lightning.bilevel import exact_hypergradient, first_order_hypergradient


def quadratic_problem(seed: int = 0, batch: int = 6, dim: int = 5):
    """ℓᵢ(θ) = ½‖θ − aᵢ‖², L_val(θ) = ½‖θ − c‖²: every gradient is known in closed form."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    c = torch.randn(dim, generator=g, dtype=torch.float64)
    theta = torch.randn(dim, generator=g, dtype=torch.float64).requires_grad_(True)

    def inner(p):
        return 0.5 * ((p["theta"].unsqueeze(0) - a) ** 2).sum(1)

    def val(p):
        return 0.5 * ((p["theta"] - c) ** 2).sum()

    return {"theta": theta}, inner, val, a, c


def test_exact_matches_closed_form_unrolled_step():
    params, inner, val, a, c = quadratic_problem()
    theta = params["theta"].detach()
    w = torch.linspace(0.5, 1.5, a.shape[0], dtype=torch.float64)
    lr, batch = 0.3, a.shape[0]
    # θ' = θ − α/B Σ wᵢ(θ − aᵢ);  ∂L_val(θ')/∂wᵢ = ⟨θ' − c, −α/B (θ − aᵢ)⟩
    theta_new = theta - lr / batch * (w.unsqueeze(1) * (theta - a)).sum(0)
    expected = -(lr / batch) * ((theta - a) @ (theta_new - c))
    got = exact_hypergradient(params, inner, val, w, lr)
    torch.testing.assert_close(got.grad_weights, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("central", [True, False])
def test_first_order_matches_closed_form_at_theta(central):
    params, inner, val, a, c = quadratic_problem(seed=1)
    theta = params["theta"].detach()
    lr, batch, eps = 0.1, a.shape[0], 1e-4
    expected = -(lr / batch) * ((theta - a) @ (theta - c))
    got = first_order_hypergradient(params, inner, val, lr, eps=eps, central=central)
    if not central:
        # Hessian = I, probe step s = ε/‖v‖: [ℓ(θ+sv) − ℓ(θ)]/s = ⟨∇ℓ, v⟩ + ε‖v‖/2, known exactly.
        expected = expected - lr / batch * eps / 2 * (theta - c).norm()
    # Central differences are exact on a quadratic; both now match up to rounding.
    torch.testing.assert_close(got.grad_weights, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(got.v_norm, (theta - c).norm())


def test_first_order_uses_given_base_losses_and_leaves_params_alone():
    params, inner, val, a, c = quadratic_problem(seed=2)
    before = params["theta"].detach().clone()
    base = inner({"theta": params["theta"].detach()})
    one = first_order_hypergradient(params, inner, val, 0.1, base_losses=base, eps=1e-4)
    two = first_order_hypergradient(params, inner, val, 0.1, eps=1e-4)
    torch.testing.assert_close(one.grad_weights, two.grad_weights)
    assert torch.equal(params["theta"].detach(), before)
    assert params["theta"].grad is None  # autograd.grad only: no .grad written


def test_first_order_approaches_exact_as_lr_shrinks():
    params, inner, val, a, c = quadratic_problem(seed=3)
    w = torch.ones(a.shape[0], dtype=torch.float64)
    gaps = []
    for lr in (1e-1, 1e-2, 1e-3):
        fo = first_order_hypergradient(params, inner, val, lr, eps=1e-5, central=True).grad_weights
        ex = exact_hypergradient(params, inner, val, w, lr).grad_weights
        gaps.append(((fo - ex).norm() / ex.norm()).item())
    # v at θ vs at θ' differs by O(α): the relative gap shrinks ~10× per decade of α.
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-2


def test_tiny_llama_first_order_cosine_with_exact(tiny_policy):
    policy = tiny_policy.eval()
    vocab = policy.vocab_size
    inner_batch = random_batch(vocab, batch_size=8, seed=0)
    val_batch = random_batch(vocab, batch_size=4, seed=1)
    params = policy.trainable_named_parameters()

    def inner(p):
        return policy.functional_losses(inner_batch, p)

    def val(p):
        return policy.functional_losses(val_batch, p).mean()

    base = policy.trajectory_forward(inner_batch).loss.detach()
    fo = first_order_hypergradient(params, inner, val, lr=1e-2, base_losses=base, eps=1e-2)
    ex = exact_hypergradient(params, inner, val, torch.ones(8), lr=1e-2)
    cosine = torch.nn.functional.cosine_similarity(fo.grad_weights, ex.grad_weights, dim=0)
    assert cosine >= 0.95, cosine
    torch.testing.assert_close(fo.val_loss, ex.val_loss, rtol=1e-2, atol=0)


def test_exact_mode_gives_clear_error_when_attention_cannot_double_backward(tiny_llama_config):
    from boost_lightning.models import PolicyModel

    policy = PolicyModel(config=tiny_llama_config, r=2)
    batch = random_batch(policy.vocab_size, batch_size=2)
    params = policy.trainable_named_parameters()

    def inner(p):
        raise RuntimeError("derivative for aten::_scaled_dot_product_flash_attention_backward is not implemented")

    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        exact_hypergradient(params, inner, lambda p: policy.functional_losses(batch, p).mean(), torch.ones(2), 0.1)


def test_first_order_with_a_diagonal_preconditioner_matches_closed_form():
    # Adaptive lookahead θ' = θ − αP·Σwᵢ∇ℓᵢ/B: ∂L_val/∂wᵢ = −α/B·⟨P(θ − c), θ − aᵢ⟩ (central differences are exact).
    params, inner, val, a, c = quadratic_problem(seed=4)
    theta = params["theta"].detach()
    p = torch.tensor([0.5, 2.0, 1.0, 4.0, 0.25], dtype=torch.float64)
    lr, batch = 0.1, a.shape[0]
    expected = -(lr / batch) * ((theta - a) @ (p * (theta - c)))
    got = first_order_hypergradient(params, inner, val, lr, eps=1e-4, central=True,
                                    precondition=lambda v: [p * v[0]])
    torch.testing.assert_close(got.grad_weights, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(got.v_norm, (theta - c).norm())  # ‖v‖ is still the raw validation gradient's
    plain = first_order_hypergradient(params, inner, val, lr, eps=1e-4, central=True, precondition=lambda v: v)
    torch.testing.assert_close(plain.grad_weights, -(lr / batch) * ((theta - a) @ (theta - c)), rtol=0, atol=1e-9)
