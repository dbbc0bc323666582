"""The convolutions on torch's own oneDNN (normlab.accel.onednn): found in libtorch_cpu,
torch's numbers bit for bit where used (forward, backward-data, backward-weights), the
training step's convolutions on them, and torch's path wherever they do not apply.

The contract, not this CPU's path: a layer is kept where its numbers are torch's and
refused where they are not (bf16 on a CPU without native bf16, where torch computes those
convolutions another way), and the step equals autograd's either way. Which layers a CPU
keeps is recorded, not asserted (tests/test_dispatch.py runs this module under the
dispatch other CPUs get)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import require_tool
from normlab.accel import onednn
from normlab.accel.handstep import HandStep
from test_handstep import assert_same_state, batches, net

LAYERS = [  # the seed network's convolutions: (input, weights, padding)
    ((64, 1, 28, 28), (8, 1, 3, 3), 0),
    ((64, 8, 26, 26), (16, 8, 3, 3), 0),
    ((64, 16, 24, 24), (8, 16, 1, 1), 0),
    ((64, 8, 12, 12), (12, 8, 3, 3), 0),
    ((64, 14, 8, 8), (14, 14, 3, 3), 1),
    ((64, 14, 1, 1), (10, 14, 1, 1), 0),
    ((32, 8, 12, 12), (12, 8, 3, 3), 0),  # the epoch's short last batch
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def available() -> None:
    require_tool(onednn.api() is not None,
                 "torch's oneDNN through libtorch_cpu's symbol table (normlab.accel.onednn)")


def test_the_c_api_is_found_in_torchs_library():
    found = onednn.symbols(onednn.torch_library(), onednn.NAMES)
    require_tool(len(found) == len(onednn.NAMES), "libtorch_cpu's symbol table")
    assert all(value > 0 for value in found.values())
    assert onednn.symbols(onednn.torch_library(), ("no_such_function_here",)) == {}


def test_the_symbols_are_read_once_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_KERNEL_CACHE", str(tmp_path))
    path = onednn.torch_library()
    first = onednn._cached_symbols(path, onednn.NAMES)
    require_tool(len(first) == len(onednn.NAMES), "libtorch_cpu's symbol table")
    assert len(list(tmp_path.glob("onednn-symbols-*.json"))) == 1

    def unread(*args):
        raise AssertionError("read the table again")

    monkeypatch.setattr(onednn, "symbols", unread)
    assert onednn._cached_symbols(path, onednn.NAMES) == first
    with pytest.raises(AssertionError):  # other names: another entry
        onednn._cached_symbols(path, onednn.NAMES[:3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("x_shape,w_shape,pad", LAYERS)
def test_a_layer_computes_torchs_numbers_bitwise(x_shape, w_shape, pad, dtype, monkeypatch):
    """A kept layer: forward, backward-data and backward-weights equal F.conv2d's and
    convolution_backward's on new data, several times (the primitives are kept). A refused
    one: oneDNN makes no such primitives here, or the ones it makes compute other numbers
    than torch's on that data (the check refused them for a reason)."""
    available()
    gen = torch.Generator().manual_seed(7)
    w = torch.empty(w_shape, dtype=dtype, memory_format=torch.channels_last)
    x = torch.empty(x_shape, dtype=dtype, memory_format=torch.channels_last)
    layer = onednn.conv(x, w, (1, 1), (pad, pad), (1, 1), 1, True)
    kept = layer is not None
    if not kept:  # the same primitives without the check
        monkeypatch.setattr(onednn, "_LAYERS", {})
        monkeypatch.setattr(onednn, "_matches", lambda *args: True)
        layer = onednn.conv(x, w, (1, 1), (pad, pad), (1, 1), 1, True)
        if layer is None:
            return  # none made: torch's convolution, as test_the_step_... shows
    forward, backward_data, backward_weights = layer.impl()
    assert forward and backward_data and backward_weights
    same = []
    for _ in range(3):
        x.copy_(torch.randn(x_shape, generator=gen))
        w.copy_(torch.randn(w_shape, generator=gen) / 3)
        y = F.conv2d(x, w, None, 1, pad)
        dy = torch.randn(y.shape, generator=gen).to(dtype).contiguous(
            memory_format=torch.channels_last)
        dx, dw, _ = torch.ops.aten.convolution_backward(
            dy, x, w, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, [True, True, False])
        ours = layer.forward(x, w)
        our_dx, our_dw = layer.backward(dy, x, w, True)
        assert ours.is_contiguous(memory_format=torch.channels_last)
        assert our_dw.dtype == torch.float32
        assert layer.backward(dy, x, w, False)[0] is None
        same.append(torch.equal(ours, y) and torch.equal(our_dx, dx)
                    and torch.equal(our_dw, dw.float()))
    if kept:
        assert all(same)
    else:
        assert not all(same), f"refused, yet {layer.impl()} computes torch's numbers"


def made_layers(monkeypatch) -> list[tuple]:
    """Every layer creation from here on, recorded (each a new object), instead of made:
    what is kept, and under which key, without depending on what this CPU keeps."""
    made: list[tuple] = []

    def create(*args):
        made.append(args)
        return object()

    monkeypatch.setattr(onednn, "_LAYERS", {})
    monkeypatch.setattr(onednn, "_create", create)
    return made


def test_layers_are_kept_per_shape_and_thread_count(monkeypatch):
    made = made_layers(monkeypatch)
    x = torch.randn(16, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    w = torch.randn(12, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    a = onednn.conv(x, w, (1, 1), (0, 0), (1, 1), 1, True)
    assert onednn.conv(x, w, (1, 1), (0, 0), (1, 1), 1, True) is a and len(made) == 1
    assert onednn.conv(x[:8], w, (1, 1), (0, 0), (1, 1), 1, True) is not a
    assert onednn.conv(x, w, (1, 1), (0, 0), (1, 1), 1, False) is not a  # no data gradient
    torch.set_num_threads(2)
    assert onednn.conv(x, w, (1, 1), (0, 0), (1, 1), 1, True) is not a
    assert len(made) == 4


def test_torchs_settings_are_part_of_a_layers_check(monkeypatch):
    """A layer checked with oneDNN enabled in torch is not used once torch stops using
    oneDNN for convolutions (torch's numbers would then come from another kernel), and none
    is made while it is off."""
    create = onednn._create
    made = made_layers(monkeypatch)
    x = torch.randn(16, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    w = torch.randn(12, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    a = onednn.conv(x, w, (1, 1), (0, 0), (1, 1), 1, True)
    torch.backends.mkldnn.enabled = False
    try:
        assert onednn.conv(x, w, (1, 1), (0, 0), (1, 1), 1, True) is not a
        assert create(x, w, (1, 1), (0, 0), True) is None
    finally:
        torch.backends.mkldnn.enabled = True
    assert onednn.conv(x, w, (1, 1), (0, 0), (1, 1), 1, True) is a and len(made) == 2


def test_what_it_does_not_take_is_left_to_torch():
    available()
    x = torch.randn(16, 8, 12, 12)
    w = torch.randn(12, 8, 3, 3)
    cl = torch.channels_last
    assert onednn.conv(x, w, (1, 1), (0, 0), (1, 1), 1, True) is None  # not channels-last
    x, w = x.contiguous(memory_format=cl), w.contiguous(memory_format=cl)
    assert onednn.conv(x.double(), w.double(), (1, 1), (0, 0), (1, 1), 1, True) is None
    assert onednn.conv(x, w.bfloat16(), (1, 1), (0, 0), (1, 1), 1, True) is None
    assert onednn.conv(x, w, (1, 1), "same", (1, 1), 1, True) is None
    assert onednn.conv(x, w, (1, 1), (0, 0), (2, 2), 1, True) is None
    assert onednn.conv(x, w[:, :4], (1, 1), (0, 0), (1, 1), 2, True) is None


def test_a_layer_whose_numbers_differ_from_torchs_is_not_used(monkeypatch):
    """The check against torch decides: a layer it refuses leaves the convolution to
    torch, and the step is still autograd's bit for bit."""
    available()
    monkeypatch.setattr(onednn, "_LAYERS", {})
    monkeypatch.setattr(onednn, "_matches", lambda *args: False)
    model = net("bn", dropout=0.05)
    step = HandStep.build(model, "bf16")
    x, y = next(batches((24,)))
    step(x, y)
    assert step._layers[x.shape] == [None] * 7


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_the_step_on_onednn_is_the_step_on_torch_bitwise(norm, precision):
    """At the seed protocol's batch (64, and a short last batch) each convolution of the
    step runs on the kept primitives where they compute torch's numbers and on torch's
    where not (how many are kept depends on the CPU: tests/test_dispatch.py records it),
    and the losses, outputs, gradients, statistics and weights equal the step's on torch's
    convolutions."""
    available()
    a, b = net(norm, dropout=0.05), net(norm, dropout=0.05)
    direct, on_torch = HandStep.build(a, precision), HandStep.build(b, precision, False)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for step, (x, y) in enumerate(batches((64, 64, 32))):
        outs = []
        for by_hand, opt in ((direct, opt_a), (on_torch, opt_b)):
            torch.manual_seed(100 + step)
            outs.append(by_hand(x, y))
            opt.step()
        (loss_a, out_a), (loss_b, out_b) = outs
        assert torch.equal(loss_a, loss_b) and torch.equal(out_a, out_b)
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(pa.grad, pb.grad)
        assert len(direct._layers[x.shape]) == 7
        assert on_torch._layers[x.shape] == [None] * 7
    assert_same_state(a, b)
