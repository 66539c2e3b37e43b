"""``alignment: cosine``: per-unit gradient norms from random forward probes, and the hypergradient they rescale."""

import pytest
import torch

from boost_lightning.bench.batches import random_batch
from boost_lightning.bilevel import HypergradientOptions, gradient_norms, policy_hypergradient


def test_gradient_norms_match_the_closed_form_on_a_quadratic():
    # ℓᵢ(θ) = ½‖θ − aᵢ‖²: ∇ℓᵢ = θ − aᵢ, known exactly; 4,000 probes put the estimate within ~1.1 % (1/√(2K)).
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 5, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, 6, dtype=torch.float64)[:, None]
    theta = torch.randn(5, generator=g, dtype=torch.float64)

    def inner(p):
        return 0.5 * ((p["theta"].unsqueeze(0) - a) ** 2).sum(1)

    norms = gradient_norms({"theta": theta}, inner, inner({"theta": theta}), probes=4000, eps=1e-6, seed=3)
    torch.testing.assert_close(norms, (theta - a).norm(dim=1), rtol=0.06, atol=0)
    again = gradient_norms({"theta": theta}, inner, inner({"theta": theta}), probes=4000, eps=1e-6, seed=3)
    assert torch.equal(norms, again)  # the seed fixes the directions: a resumed run draws the same ones


def test_gradient_norms_match_per_row_autograd_on_a_tiny_lora_llama(tiny_policy):
    policy = tiny_policy.eval()
    batch = random_batch(policy.vocab_size, batch_size=4, seed=0)
    params = policy.trainable_named_parameters()
    exact = []
    for i in range(4):
        loss = policy.functional_losses(batch, params)[i]
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        exact.append(torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None)))
    exact = torch.stack(exact)
    with torch.no_grad():
        base = policy.functional_losses(batch, params)
    estimate = gradient_norms(params, lambda p: policy.functional_losses(batch, p), base, probes=400, eps=1e-3)
    # 400 probes: ~3.5 % statistical error per row, plus the forward difference's curvature term.
    torch.testing.assert_close(estimate, exact, rtol=0.2, atol=0)
    assert all(torch.equal(p, q) for p, q in zip(params.values(), policy.trainable_named_parameters().values()))


def _hypergradient(policy, inner, outer, multiplier, alignment, probes=16):
    params = list(policy.trainable_named_parameters().values())
    optimizer = torch.optim.SGD(params, lr=0.1)
    options = HypergradientOptions(preconditioner="none", fd_central=True, alignment=alignment, norm_probes=probes,
                                   fd_eps=1e-3)
    return policy_hypergradient(policy, inner, outer, options, optimizer, multiplier, probe_seed=7)


def test_cosine_divides_each_dot_product_by_its_norm_on_the_batch_rms_scale(tiny_policy):
    policy = tiny_policy.eval()
    inner, outer = random_batch(policy.vocab_size, 6, seed=0), random_batch(policy.vocab_size, 3, seed=1)
    multiplier = torch.ones(6)
    dot = _hypergradient(policy, inner, outer, multiplier, "dot")
    cosine = _hypergradient(policy, inner, outer, multiplier, "cosine")
    params = policy.trainable_named_parameters()
    with torch.no_grad():
        base = policy.functional_losses(inner, params)
    norms = gradient_norms(params, lambda p: policy.functional_losses(inner, p), base, probes=16, eps=1e-3, seed=7)
    expected = dot.grad_weights * norms.pow(2).mean().sqrt() / norms
    torch.testing.assert_close(cosine.grad_weights, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(cosine.directional, dot.directional * norms.pow(2).mean().sqrt() / norms,
                               rtol=1e-5, atol=0)


def test_cosine_ignores_a_rows_scale_where_the_dot_product_follows_it(tiny_policy):
    # The same row twice, once with its loss doubled (objective multiplier 2): its gradient doubles, its direction
    # does not. The dot product doubles the hypergradient; the cosine gives both copies the same value.
    policy = tiny_policy.eval()
    row = random_batch(policy.vocab_size, 1, seed=5)
    inner = {k: torch.cat([v, v]) if torch.is_tensor(v) else v + v for k, v in row.items()}
    outer = random_batch(policy.vocab_size, 3, seed=1)
    multiplier = torch.tensor([1.0, 2.0])
    dot = _hypergradient(policy, inner, outer, multiplier, "dot").grad_weights
    cosine = _hypergradient(policy, inner, outer, multiplier, "cosine").grad_weights
    torch.testing.assert_close(dot[1], 2 * dot[0], rtol=1e-4, atol=0)
    torch.testing.assert_close(cosine[1], cosine[0], rtol=1e-4, atol=0)


@pytest.mark.parametrize("kwargs,match", [({"alignment": "angle"}, "alignment"),
                                          ({"alignment": "cosine", "method": "exact"}, "first_order"),
                                          ({"alignment": "cosine", "norm_probes": 0}, "norm_probes")])
def test_bad_alignment_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HypergradientOptions(**kwargs)
