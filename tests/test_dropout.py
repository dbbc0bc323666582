"""SparseDropout and the position draw: the distribution of nn.Dropout (each unit dropped
independently with probability p, survivors scaled by 1/(1-p)), its gradient, its
reproducibility from torch's seed. Statistical checks use fixed seeds and ~5-sigma bounds,
so they are deterministic and would catch a wrong rate, scale or dependence."""

import math

import pytest
import torch
from torch import nn

from normlab.models import dropout
from normlab.models.dropout import (
    SparseDropout,
    bernoulli_positions,
    drop_positions,
    sparse_dropout,
)


def masks(n: int, p: float, draws: int, seed: int = 0) -> torch.Tensor:
    """(draws, n) bool: the dropped units of consecutive draws from one seeded stream."""
    torch.manual_seed(seed)
    out = torch.zeros(draws, n, dtype=torch.bool)
    for d in range(draws):
        out[d, bernoulli_positions(n, p)] = True
    return out


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5])
def test_drop_rate_matches_p_on_a_large_tensor(p):
    torch.manual_seed(1)
    n = 400_000
    k = bernoulli_positions(n, p).numel()
    assert abs(k - n * p) < 5 * math.sqrt(n * p * (1 - p))


def test_positions_sorted_unique_in_range():
    torch.manual_seed(2)
    pos = bernoulli_positions(10_000, 0.3)
    assert pos.dtype == torch.long
    assert pos.min() >= 0 and pos.max() < 10_000
    assert torch.equal(pos, torch.unique(pos))  # sorted and without repeats


def test_count_is_binomial():
    """Chi-square of the number of dropped units against Binomial(n, p)."""
    n, p, draws = 40, 0.1, 6000
    counts = masks(n, p, draws, seed=3).sum(1)
    observed = torch.bincount(counts, minlength=n + 1).double()
    pmf = torch.tensor([math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)])
    expected = pmf * draws
    keep = expected >= 5  # pool the tails
    obs = torch.cat([observed[keep], observed[~keep].sum().view(1)])
    exp = torch.cat([expected[keep], expected[~keep].sum().view(1)])
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof)
    assert abs(counts.double().var().item() - n * p * (1 - p)) < 0.1 * n * p * (1 - p)


def test_per_position_rates_are_uniform_and_units_independent():
    n, p, draws = 24, 0.2, 20_000
    m = masks(n, p, draws, seed=4).double()
    rate = m.mean(0)
    sigma = math.sqrt(p * (1 - p) / draws)
    assert (rate - p).abs().max() < 5 * sigma
    # Pairwise: P(i and j dropped) = p^2 for every i != j (neighbours included, where a
    # wrong gap distribution would show first).
    joint = (m.T @ m) / draws
    off = ~torch.eye(n, dtype=torch.bool)
    sigma2 = math.sqrt(p * p * (1 - p * p) / draws)
    assert (joint[off] - p * p).abs().max() < 5 * sigma2
    # Runs: P(i+1 dropped | i dropped) = p.
    both = (m[:, :-1] * m[:, 1:]).sum()
    first = m[:, :-1].sum()
    assert abs(both / first - p) < 5 * math.sqrt(p * (1 - p) / first)


def test_independent_across_steps():
    n, p, draws = 24, 0.2, 20_000
    m = masks(n, p, draws, seed=5).double()
    assert not torch.equal(m[0], m[1])
    lagged = (m[:-1] * m[1:]).mean(0)  # same unit, consecutive calls
    sigma2 = math.sqrt(p * p * (1 - p * p) / (draws - 1))
    assert (lagged - p * p).abs().max() < 5 * sigma2
    x = torch.ones(64, 16, 24, 24)
    a, b = sparse_dropout(x, 0.01), sparse_dropout(x, 0.01)
    assert not torch.equal(a, b)


def test_gap_chunks_continue_the_process():
    """A mean so small that the first chunk of gaps rarely reaches n: more are drawn."""
    torch.manual_seed(6)
    n, p = 2_000, 0.001
    total = sum(bernoulli_positions(n, p).numel() for _ in range(3000))
    assert abs(total - 3000 * n * p) < 5 * math.sqrt(3000 * n * p * (1 - p))


def test_survivors_scaled_and_dropped_zero():
    torch.manual_seed(7)
    p = 0.3
    x = torch.rand(8, 4, 6, 6) + 0.5  # no zeros
    y = SparseDropout(p).train()(x)
    dropped = y == 0
    assert 0 < dropped.sum() < x.numel()
    torch.testing.assert_close(y[~dropped], x[~dropped] / (1 - p), rtol=1e-6, atol=0)


def test_reproducible_from_manual_seed_and_memory_format_free():
    x = torch.rand(16, 8, 10, 10) + 0.5
    drop = SparseDropout(0.05).train()
    torch.manual_seed(11)
    a = drop(x)
    torch.manual_seed(11)
    b = drop(x)
    torch.manual_seed(11)
    c = drop(x.contiguous(memory_format=torch.channels_last))
    torch.manual_seed(12)
    d = drop(x)
    assert torch.equal(a, b)
    assert torch.equal(a, c)  # the mask is by logical position
    assert c.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(a, d)


def test_gradient_equals_autograd_of_mask_multiplication():
    p = 0.2
    x = (torch.rand(4, 3, 5, 5) + 0.5).requires_grad_()
    w = torch.randn(4, 3, 5, 5)
    torch.manual_seed(13)
    y = SparseDropout(p).train()(x)
    (y * w).sum().backward()
    mask = (y.detach() != 0).float()
    x2 = x.detach().clone().requires_grad_()
    (x2 * mask / (1 - p) * w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(y.detach(), x2.detach() * mask / (1 - p))


def test_drop_positions_gradcheck_any_layout():
    torch.manual_seed(14)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    pos = torch.tensor([0, 5, 17, 40])
    layouts = (x, x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3),
               x[..., ::2])  # contiguous, channels-last, permuted, not dense
    for t in layouts:
        t = t.detach().requires_grad_()
        assert torch.autograd.gradcheck(lambda v: drop_positions(v, pos, 1.25), (t,))
        y = drop_positions(t, pos, 1.25)
        flat = y.detach().reshape(-1)
        assert (flat[pos] == 0).all() and (flat != 0).sum() == t.numel() - len(pos)


def test_inplace_variant():
    torch.manual_seed(15)
    x = torch.rand(64, 16, 12, 12) + 0.5
    ref = x.clone()
    torch.manual_seed(16)
    expected = SparseDropout(0.1)(ref)
    torch.manual_seed(16)
    out = SparseDropout(0.1, inplace=True)(x)
    assert out.data_ptr() == x.data_ptr()
    assert torch.equal(out, expected)


def test_eval_mode_and_p_zero_are_identity_and_p_one_zeros():
    x = torch.randn(4, 3, 5, 5)
    assert SparseDropout(0.5).eval()(x) is x
    state = torch.get_rng_state()
    assert SparseDropout(0.0).train()(x) is x
    assert torch.equal(state, torch.get_rng_state())  # p = 0 draws nothing
    assert torch.equal(SparseDropout(1.0).train()(x), torch.zeros_like(x))
    with pytest.raises(ValueError):
        SparseDropout(1.5)
    assert repr(SparseDropout(0.01)) == "SparseDropout(p=0.01, inplace=False)"


def test_rate_matches_nn_dropout_on_a_conv_map():
    """Same mean fraction dropped as nn.Dropout on the seed's largest map (loose check)."""
    torch.manual_seed(17)
    x = torch.ones(64, 16, 24, 24)
    ours = sum((SparseDropout(0.01)(x) == 0).sum().item() for _ in range(20))
    theirs = sum((nn.Dropout(0.01)(x) == 0).sum().item() for _ in range(20))
    n = 20 * x.numel()
    sigma = math.sqrt(n * 0.01 * 0.99)
    assert abs(ours - n * 0.01) < 5 * sigma and abs(theirs - n * 0.01) < 5 * sigma


def test_off_the_cpu_it_is_nn_dropout_on_the_device(monkeypatch):
    """Where positions are not drawn (a GPU), SparseDropout is F.dropout: a dense mask
    drawn on the tensor's device, the same numbers as nn.Dropout from the same seed."""
    monkeypatch.setattr(dropout, "draws_positions", lambda device: False)
    x = torch.randn(8, 4, 6, 6)
    torch.manual_seed(5)
    ours = SparseDropout(0.3)(x)
    torch.manual_seed(5)
    assert torch.equal(ours, nn.Dropout(0.3)(x))
