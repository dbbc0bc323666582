"""The seed's Net: its exact keyword API, parameter counts, shapes and error messages."""

import dataclasses
import warnings

import pytest
import torch

from normlab.accel import accelerate, accelerated_net
from normlab.cli import main
from normlab.models import ModelConfig, Net, count_parameters, make_norm


def seed_examples():
    """The four usage examples of the seed README, verbatim but for the import line."""
    from normlab.models import Net

    model = Net()
    yield "default (BN)", model
    model = Net(
        batch_norm=False,
        layer_norm=False,
        group_norm=True,
        group_norm_groups=2,
    )
    yield "GN only", model
    model = Net(
        batch_norm=False,
        layer_norm=True,
        group_norm=False,
    )
    yield "LN only", model
    model = Net(
        batch_norm=True,
        layer_norm=False,
        group_norm=False,
        dropout_value=0,
    )
    yield "BN only, no dropout", model


@pytest.mark.parametrize("label,model", list(seed_examples()), ids=lambda v: str(v)[:20])
def test_seed_examples_have_5760_parameters(label, model):
    assert count_parameters(model) == 5760
    out = model(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10)
    assert torch.allclose(out.exp().sum(1), torch.ones(4), atol=1e-5)  # log-probabilities


def test_seed_flags_resolve_to_registry_names():
    assert Net().config.norms == ("bn",)
    assert Net(batch_norm=False, group_norm=True).config.norms == ("gn",)
    assert Net(batch_norm=False, layer_norm=True).config.norms == ("ln",)
    assert Net(batch_norm=False).config.norms == ("none",)
    assert Net(dropout_value=0).config.dropout == 0.0


def test_layer_order_matches_seed():
    # The model is plain PyTorch whatever the config says about the acceleration.
    seed = Net.from_config(ModelConfig(dropout_draw="bernoulli"))  # nn.Dropout, as the seed
    kinds = [type(m).__name__ for m in seed.convblock1]
    assert kinds == ["Conv2d", "ReLU", "BatchNorm2d", "Dropout"]
    assert seed.convblock1[0].bias is None
    assert [type(m).__name__ for m in Net().convblock3] == ["Conv2d"]  # transition: bare
    assert [type(m).__name__ for m in Net.from_config(ModelConfig(dropout=0)).convblock2] == [
        "Conv2d", "ReLU", "BatchNorm2d"]
    for kernels in ("normlab", "aten"):
        plain = Net.from_config(ModelConfig(kernels=kernels))
        assert [type(m).__name__ for m in plain.convblock1] == [
            "Conv2d", "ReLU", "BatchNorm2d", "SparseDropout"]
        assert type(plain.pool1) is torch.nn.MaxPool2d
    # The acceleration swaps in its fused modules: positions -> the dropout fused into the
    # norm; normlab's kernels -> the ReLU too. The seed's state dict (the ReLU's and the
    # dropout's places are kept), and in eval mode exactly its network.
    fused = accelerated_net(ModelConfig(dropout_draw="positions", kernels="aten"))
    assert [type(m).__name__ for m in fused.convblock1] == [
        "Conv2d", "ReLU", "BatchNormDropout", "FusedDropout"]
    folded = accelerated_net(ModelConfig(kernels="normlab"))
    assert [type(m).__name__ for m in folded.convblock1] == [
        "Conv2d", "FoldedReLU", "BatchNormDropout", "FusedDropout"]
    assert "FoldedReLU(applied by the norm after it)" in repr(folded)
    assert [type(m).__name__ for m in
            accelerated_net(ModelConfig(dropout_draw="bernoulli")).convblock1] == [
        "Conv2d", "FoldedReLU", "BatchNormDropout", "Dropout"]
    x = torch.randn(5, 1, 28, 28)
    for net in (fused, folded):
        assert isinstance(net.convblock1[2], torch.nn.BatchNorm2d)
        assert list(net.state_dict()) == list(seed.state_dict())
        net.load_state_dict(seed.state_dict())
        net.eval(), seed.eval()
        assert torch.equal(net(x), seed(x))


@pytest.mark.parametrize("norm", ["bn", "ln", "gn", "in", "none"])  # the seed's: 5,760 each
def test_norm_choice_forward_is_finite(norm):
    model = Net(norm=norm, groups=2)
    expected = 5632 if norm == "none" else 5760
    assert count_parameters(model) == expected
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    model.eval()
    assert torch.isfinite(model(torch.randn(1, 1, 28, 28))).all()


def test_layer_and_instance_norm_statistics():
    x = torch.randn(2, 4, 3, 3)
    ln, inorm = make_norm("ln", 4), make_norm("in", 4)
    flat = x.flatten(1)
    var = flat.var(1, unbiased=False, keepdim=True)
    expected_ln = (flat - flat.mean(1, keepdim=True)) / (var + 1e-5).sqrt()
    assert torch.allclose(ln(x).flatten(1), expected_ln, atol=1e-5)
    assert torch.allclose(inorm(x), torch.nn.functional.instance_norm(x), atol=1e-5)


def test_unknown_norm_lists_choices():
    with pytest.raises(ValueError, match=r"unknown norm 'bx'.*'bn', 'ln', 'gn', 'in', 'none'"):
        Net(norm="bx")


@pytest.mark.parametrize("groups", [3, 4, 5])
def test_groups_must_divide_every_block(groups):
    widths = r"does not divide convblock\d's \d+ channels.*8, 16, 12, 14, 14"
    with pytest.raises(ValueError, match=widths):
        Net(norm="gn", groups=groups)
    with pytest.raises(ValueError, match="does not divide"):
        Net(batch_norm=False, group_norm=True, group_norm_groups=groups)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_range(p):
    with pytest.raises(ValueError, match=r"dropout_value must be in \[0, 1\)"):
        Net(dropout_value=p)


def test_norm_with_conflicting_flag():
    with pytest.raises(ValueError, match="norm='gn' conflicts with batch_norm=True"):
        Net(norm="gn", batch_norm=True)
    Net(norm="gn", batch_norm=False, group_norm=True)  # consistent flags are fine


def test_stacked_seed_flags_warn_and_stack():
    with pytest.warns(UserWarning, match="batch_norm=False, layer_norm=True"):
        model = Net(layer_norm=True)
    assert model.config.norms == ("bn", "ln")
    kinds = [type(m).__name__ for m in model.convblock1]
    assert kinds == ["Conv2d", "ReLU", "BatchNorm2d", "GroupNorm", "SparseDropout"]
    for kernels, relu_and_bn in (("aten", ["ReLU", "BatchNorm2d"]),
                                 ("normlab", ["FoldedReLU", "BatchNormDropout"])):
        accelerate(model, dataclasses.replace(model.config, kernels=kernels))
        kinds = [type(m).__name__ for m in model.convblock1]  # the dropout into the last norm
        assert kinds == ["Conv2d", *relu_and_bn, "GroupNormDropout", "FusedDropout"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Net(batch_norm=False, layer_norm=True)  # one norm: no warning


def test_summary_command_prints_5760(capsys):
    assert main(["summary"]) == 0
    out = capsys.readouterr().out
    assert "Total params: 5,760" in out and "convblock7" in out
    assert main(["summary", "--norm", "none"]) == 0
    assert "parameters: 5,632" in capsys.readouterr().out


def test_summary_bad_groups_is_a_clean_error(capsys):
    assert main(["summary", "--norm", "gn", "--groups", "3"]) == 2
    assert "does not divide" in capsys.readouterr().err
