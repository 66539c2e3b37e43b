"""Adam's preconditioner is the geometry the optimizer really moves in."""

import torch

from boost_lightning.bilevel.preconditioner import adam_preconditioner


def test_preconditioned_first_moment_is_the_step_adam_takes_in_every_parameter_group():
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, generator=g)) for _ in range(3)]
    # Two groups with their own betas and eps: each parameter must be scaled with its own group's.
    optimizer = torch.optim.Adam([{"params": params[:1], "eps": 0.5, "betas": (0.9, 0.9)},
                                  {"params": params[1:], "eps": 1e-8}], lr=0.1)
    assert adam_preconditioner(optimizer, params) is None  # no second moments before the first step: P = I
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        before = [p.detach().clone() for p in params]
        optimizer.step()
    # Adam's step is Δθ = −lr · m̂ / (√v̂ + eps), so P applied to m̂ must give −Δθ / lr.
    m_hat = []
    for p in params:
        group = next(gr for gr in optimizer.param_groups if any(q is p for q in gr["params"]))
        state = optimizer.state[p]
        m_hat.append(state["exp_avg"] / (1 - group["betas"][0] ** float(state["step"])))
    scaled = adam_preconditioner(optimizer, params)(m_hat)
    for p, b, s in zip(params, before, scaled):
        torch.testing.assert_close(s, -(p.detach() - b) / 0.1, rtol=1e-5, atol=1e-6)


def test_sgd_keeps_no_second_moments_and_gets_the_identity():
    p = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([p], lr=0.1)
    p.grad = torch.ones(2)
    optimizer.step()
    assert adam_preconditioner(optimizer, [p]) is None
