"""The training step by hand (normlab.accel.handstep) against autograd: bitwise the same
losses, outputs, gradients, running statistics and weights; the networks it takes and the
ones it leaves to autograd; and the dropout positions drawn at once."""

import pytest
import torch
import torch.nn.functional as F

from normlab.accel import accelerated_net
from normlab.accel.handstep import HandStep
from normlab.models import ModelConfig, Net
from normlab.models import dropout as dropout_module
from normlab.models.dropout import bernoulli_positions, bernoulli_positions_many
from normlab.training.engine import TensorData, l1_parameters, train_one_epoch


def net(norm="bn", **options) -> Net:
    torch.manual_seed(1)
    model = accelerated_net(ModelConfig(norms=(norm,), kernels="normlab", **options))
    return model.to(memory_format=torch.channels_last).train()


def batches(sizes=(16, 16, 9)):
    gen = torch.Generator().manual_seed(4)
    for n in sizes:
        x = torch.randn(n, 1, 28, 28, generator=gen).contiguous(
            memory_format=torch.channels_last)
        yield x, torch.randint(0, 10, (n,), generator=gen)


def autograd_step(model, x, y, precision):
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        out = model(x)
    out = out.float()
    loss = F.nll_loss(out, y)
    loss.backward()
    return loss, out


def assert_same_state(a: Net, b: Net) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"differ: {different}"


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("norm,dropout", [("bn", 0.05), ("gn", 0.05), ("ln", 0.05),
                                          ("in", 0.05), ("bn", 0.0)])
def test_a_step_by_hand_is_autograds_bitwise(norm, dropout, precision):
    """Three SGD steps each way (the last batch smaller, so its shape is new) from the same
    weights and generator state: every loss, output, gradient and the weights and running
    statistics after them equal."""
    a, b = net(norm, dropout=dropout), net(norm, dropout=dropout)
    by_hand = HandStep.build(b, precision)
    assert by_hand is not None
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for step, (x, y) in enumerate(batches((16, 16, 16, 9))):
        assert by_hand.applies(x)
        torch.manual_seed(100 + step)
        opt_a.zero_grad(set_to_none=True)
        loss_a, out_a = autograd_step(a, x, y, precision)
        for p in b.parameters():  # whatever .grad holds is replaced: no zero_grad needed
            p.grad = torch.full_like(p, 7.0)
        torch.manual_seed(100 + step)
        loss_b, out_b = by_hand(x, y)
        assert not loss_b.requires_grad and loss_b.dtype == torch.float32
        assert torch.equal(loss_a, loss_b) and torch.equal(out_a, out_b)
        assert out_b.dtype == torch.float32
        for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.equal(pa.grad, pb.grad), name
        opt_a.step()
        opt_b.step()
    assert_same_state(a, b)


def test_the_generator_is_left_where_the_modules_leave_it():
    """The dropout draws by hand consume the global generator exactly as the modules'."""
    a, b = net(dropout=0.1), net(dropout=0.1)
    by_hand = HandStep.build(b, "bf16")
    for x, y in batches((8, 8, 8)):  # the first draws one by one, the others at once
        torch.manual_seed(7)
        autograd_step(a, x, y, "bf16")
        after_a = torch.rand(4)
        torch.manual_seed(7)
        by_hand(x, y)
        after_b = torch.rand(4)
        assert torch.equal(after_a, after_b)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_train_one_epoch_by_hand_and_by_autograd_give_the_same_run(mnist, precision):
    """The engine's epoch with and without the step by hand, with L1 and a last batch
    smaller than the others: the same metrics and weights."""
    data = TensorData(mnist.train_images[:300], mnist.train_labels[:300], mnist.mean,
                      mnist.std)
    runs = []
    for hand_step in (False, True):
        model = net("bn")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        metrics = [train_one_epoch(model, data, opt, seed=3, epoch=e, batch_size=64,
                                   rotation=7.0, l1=3e-5,
                                   l1_params=l1_parameters(model, "all"),
                                   precision=precision, augment="normlab",
                                   hand_step=hand_step)
                   for e in range(2)]
        for m in metrics:
            m.pop("train_seconds")
        runs.append((model, metrics))
    (a, metrics_a), (b, metrics_b) = runs
    assert metrics_a == metrics_b
    assert metrics_a[-1]["train_l1"] > 0
    assert_same_state(a, b)


@pytest.mark.parametrize("options", [
    {"kernels": "aten"},  # torch's ReLU and norms
    {"dropout_draw": "bernoulli"},  # nn.Dropout modules
    {"norms": ("bn", "ln")},  # stacked norms: the second keeps its own path
    {"norms": ("none",)},
])
def test_other_networks_are_left_to_autograd(options):
    config = {"norms": ("bn",), "kernels": "normlab", **options}
    model = accelerated_net(ModelConfig(**config)).train()
    assert HandStep.build(model, "bf16") is None
    assert HandStep.refusal(model, "bf16")  # says why


def test_hooks_eval_mode_frozen_weights_and_other_precisions_are_left_to_autograd():
    model = net()
    assert HandStep.build(model, "bf16") is not None
    assert HandStep.build(model, "fp16") is None
    handle = model.convblock4[2].register_forward_hook(lambda *args: None)
    assert HandStep.build(model, "bf16") is None
    handle.remove()
    handle = model.convblock1[0].weight.register_hook(lambda g: g)
    assert HandStep.build(model, "bf16") is None
    handle.remove()
    model.eval()
    assert HandStep.build(model, "bf16") is None
    model.train()
    model.convblock8[0].weight.requires_grad_(False)
    assert HandStep.build(model, "bf16") is None


def test_inputs_it_does_not_take():
    by_hand = HandStep.build(net(), "bf16")
    x = torch.randn(4, 1, 28, 28)
    assert by_hand.applies(x.contiguous(memory_format=torch.channels_last))
    assert not by_hand.applies(x.double().contiguous(memory_format=torch.channels_last))
    assert not by_hand.applies(torch.randn(4, 2, 28, 28))  # a contiguous layout
    contiguous = net().to(memory_format=torch.contiguous_format)
    assert not HandStep.build(contiguous, "bf16").applies(
        x.contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("p", [0.01, 0.2, 0.9])
def test_positions_drawn_at_once_are_the_calls_one_by_one(p):
    sizes = [43264, 36864, 4800, 3584, 3584, 1, 17]
    torch.manual_seed(5)
    one_by_one = [bernoulli_positions(n, p) for n in sizes]
    after = torch.rand(2)
    torch.manual_seed(5)
    at_once = bernoulli_positions_many(sizes, p)
    assert torch.equal(torch.rand(2), after)
    assert len(at_once) == len(sizes)
    for a, b in zip(one_by_one, at_once, strict=True):
        assert a.dtype == b.dtype == torch.long
        assert torch.equal(a, b)


def test_positions_at_once_fall_back_when_a_chunk_falls_short(monkeypatch):
    """A chunk that does not pass its n (forced here with chunks of 2 gaps) makes
    bernoulli_positions draw more before the next call; the draw at once then resets the
    generator and makes the calls one by one: still the same numbers."""
    monkeypatch.setattr(dropout_module, "_chunk", lambda n, p: 2)
    sizes = [500, 800, 300]
    torch.manual_seed(6)
    one_by_one = [bernoulli_positions(n, 0.1) for n in sizes]
    after = torch.rand(2)
    torch.manual_seed(6)
    at_once = bernoulli_positions_many(sizes, 0.1)
    assert torch.equal(torch.rand(2), after)
    assert all(torch.equal(a, b) for a, b in zip(one_by_one, at_once, strict=True))
    assert sum(len(a) for a in at_once) > 100  # far more points than one chunk's two


def test_batchnorm_with_a_cumulative_average_counts_as_the_modules_do():
    """momentum=None (a cumulative moving average, from the batch count): the same running
    statistics and counts as autograd's modules."""
    a, b = net(dropout=0.05), net(dropout=0.05)
    for model in (a, b):
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
    by_hand = HandStep.build(b, "bf16")
    for step, (x, y) in enumerate(batches((8, 8, 5))):
        torch.manual_seed(step)
        autograd_step(a, x, y, "bf16")
        torch.manual_seed(step)
        by_hand(x, y)
    assert_same_state(a, b)
    assert int(b.convblock1[2].num_batches_tracked) == 3
