"""A norm and its dropout fused in one module: the same values and gradients as the norm,
then dropout with the same positions, the norm's running statistics, and its state dict."""

import pytest
import torch
from torch import nn

from normlab.accel import normdrop
from normlab.accel.normdrop import BatchNormDropout, GroupNormDropout, fuse_block
from normlab.models.dropout import SparseDropout, bernoulli_positions, draws_positions

P = 0.2


def pair(kind: str):
    torch.manual_seed(3)
    norm = nn.BatchNorm2d(6) if kind == "bn" else nn.GroupNorm(2, 6)
    with torch.no_grad():  # non-trivial affine parameters
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    fused = with_dropout(nn.BatchNorm2d(6) if kind == "bn" else nn.GroupNorm(2, 6), P)
    fused.load_state_dict(norm.state_dict())
    return norm, fused


def with_dropout(norm: nn.Module, p: float) -> nn.Module:
    """``norm`` fused with the dropout after it, as the acceleration swaps it into a block."""
    block = nn.Sequential(nn.Conv2d(6, 6, 1), nn.ReLU(), norm, SparseDropout(p))
    fuse_block(block, kernels_on=False, eval_kernels=False)
    return block[2]


def positions_mask(like: torch.Tensor) -> torch.Tensor:
    """The CPU's draw: 0 at the positions bernoulli_positions picks, 1 elsewhere."""
    mask = torch.ones(like.numel())
    mask[bernoulli_positions(mask.numel(), P)] = 0
    return mask.view(like.shape)


def device_mask(like: torch.Tensor) -> torch.Tensor:
    """A GPU's draw (no host read): a dense Bernoulli(1 - p) keep-mask on the device, drawn
    in the memory order of the norm's output."""
    return torch.empty_like(like).bernoulli_(1 - P)


@pytest.mark.parametrize("kind", ["bn", "gn"])
@pytest.mark.parametrize("path", ["cpu", "device"])
def test_values_and_gradients_are_norm_then_dropout(kind, path, monkeypatch):
    """Norm, then the mask, then 1/(1-p), values and gradients as autograd's; on the CPU's
    path (positions) and on the path a GPU takes (a dense mask), the latter forced here."""
    if path == "device":
        monkeypatch.setattr(normdrop, "draws_positions", lambda device: False)
    draw = positions_mask if path == "cpu" else device_mask
    norm, fused = pair(kind)
    assert isinstance(fused, BatchNormDropout if kind == "bn" else GroupNormDropout)
    x = torch.randn(4, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(4, 6, 5, 5)

    torch.manual_seed(11)
    y = fused(x1)
    torch.manual_seed(11)
    mask = draw(x)  # the draw the fused module made
    expected = norm(x2) * mask / (1 - P)

    assert (mask == 0).any() and torch.equal(y == 0, mask == 0)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    y.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
    for a, b in zip(fused.parameters(), norm.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    if kind == "bn":  # the running statistics are the input's, exactly as BatchNorm's
        assert torch.equal(fused.running_mean, norm.running_mean)
        assert torch.equal(fused.running_var, norm.running_var)
        assert fused.num_batches_tracked == norm.num_batches_tracked == 1


@pytest.mark.parametrize("kind", ["bn", "gn"])
def test_eval_mode_and_state_dict_are_the_norms(kind):
    norm, fused = pair(kind)
    assert list(fused.state_dict()) == list(norm.state_dict())
    norm.eval(), fused.eval()
    x = torch.randn(3, 6, 4, 4)
    assert torch.equal(fused(x), norm(x))


def test_only_batch_and_group_norms_fuse():
    for other in (nn.Identity(), nn.LayerNorm([6, 4, 4]), nn.InstanceNorm2d(6)):
        assert with_dropout(other, P) is other  # left as it is, its dropout after it


def test_drop_rate_over_a_large_tensor():
    torch.manual_seed(0)
    fused = BatchNormDropout(16, 0.01)
    y = fused(torch.randn(64, 16, 24, 24))
    rate = (y == 0).float().mean().item()
    n = y.numel()
    assert abs(rate - 0.01) < 5 * (0.01 * 0.99 / n) ** 0.5  # within five standard errors


def test_device_path_drop_rate(monkeypatch):
    monkeypatch.setattr(normdrop, "draws_positions", lambda device: False)
    torch.manual_seed(0)
    y = BatchNormDropout(16, 0.01)(torch.randn(64, 16, 24, 24))
    rate = (y == 0).float().mean().item()
    assert abs(rate - 0.01) < 5 * (0.01 * 0.99 / y.numel()) ** 0.5


def test_only_the_cpu_draws_positions():
    assert draws_positions(torch.device("cpu"))
    assert not draws_positions(torch.device("cuda"))
    assert not draws_positions(torch.device("meta"))
