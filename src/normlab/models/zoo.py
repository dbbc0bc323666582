"""The normalization zoo: the norms researchers compare with BN/GN/LN/IN, in plain PyTorch.

One class per norm, channel count first (``Norm(C, **options)``), so each is a drop-in for
a network's ``norm_layer(C)``. All work on conv maps x of shape (B, C, H, W); batch
renormalization, ghost BN and RMSNorm also on feature vectors (B, C), as in an MLP
(``BatchRenorm1d``, ``GhostBatchNorm1d``, and ``RMSNorm2d`` itself).

Precision: every statistic is computed in float32 even when x is bfloat16 (under
``torch.autocast``): the input is upcast, normalised, and the result is returned in the
input's dtype, as torch's own norms do on the CPU. Parameters and buffers stay float32.

Each class is tested against a reference in tests/test_zoo.py: BatchNorm for the batch
renorm and ghost BN, timm 1.0.29 for FRN, EvoNorm and weight standardization, and
``torch.nn.RMSNorm`` for RMSNorm. Where timm's choices differ from the paper, the docstring
says which one is followed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normlab.fields import ConfigError, coerce

__all__ = [
    "BatchRenorm1d", "BatchRenorm2d", "EvoNormB0", "EvoNormS0", "FilterResponseNorm2d",
    "GhostBatchNorm1d", "GhostBatchNorm2d", "NoisyBatchNorm1d", "NoisyBatchNorm2d",
    "RMSNorm2d", "StdConv2d",
]


# --- argument checks (options arrive from configs as JSON values) --------------------------

def _positive_int(field: str, value) -> int:
    value = coerce(field, value, int)
    if value < 1:
        raise ConfigError(field, f"{field} must be at least 1, got {value}")
    return value


def _number(field: str, value, *, low: float, high: float = float("inf"),
            low_open: bool = False) -> float:
    """``value`` as a float in [low, high] (or (low, high] with ``low_open``)."""
    value = coerce(field, value, float)
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise ConfigError(field, f"{field} must be in {bracket}{low}, {high}], got {value}")
    return value


def _batchnorm_arguments(num_features, eps, momentum, affine) -> dict:
    """``nn.BatchNorm2d``'s arguments, checked (the BN subclasses of the zoo take them)."""
    return {"num_features": _positive_int("num_features", num_features),
            "eps": _number("eps", eps, low=0.0, low_open=True),
            "momentum": _number("momentum", momentum, low=0.0, high=1.0),
            "affine": coerce("affine", affine, bool)}


def _instance_std(x: torch.Tensor, eps: float) -> torch.Tensor:
    """sqrt(var + eps) over (H, W) per image and channel: (B, C, H, W) -> (B, C, 1, 1)."""
    return torch.sqrt(x.var(dim=(2, 3), unbiased=False, keepdim=True) + eps)


def _channel_view(p: torch.Tensor, dims: int = 4) -> torch.Tensor:
    """A per-channel vector (C,) shaped (1, C, 1, 1) to broadcast over (B, C, H, W) (with
    ``dims`` = 2: (1, C) over feature vectors (B, C))."""
    return p.view(1, -1, *(1,) * (dims - 2))


def _not_channels(x: torch.Tensor) -> tuple[int, ...]:
    """The dimensions a batch statistic reduces: all but the channels', (0, 2, 3) of
    (B, C, H, W) or (0,) of (B, C)."""
    return (0, *range(2, x.dim()))


# --- batch statistics ------------------------------------------------------------------------

class BatchRenorm2d(nn.BatchNorm2d):
    """Batch Renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch
    Dependence in Batch-Normalized Models", arXiv:1702.03275).

    Training normalises with the batch statistics like BN, then corrects toward the running
    statistics: ``y = gamma * (x_hat * r + d) + beta`` with

        r = clip(sigma_B / sigma_run, 1/r_max, r_max)
        d = clip((mu_B - mu_run) / sigma_run, -d_max, d_max)

    treated as constants (no gradient flows through r and d: the forward sees the running
    statistics' normalisation while the gradient sees the batch's, which is the point).
    With r_max = 1 and d_max = 0 it is BatchNorm exactly; eval is BatchNorm's eval.

    Warm-up: the paper starts at r_max = 1, d_max = 0 (plain BN) and relaxes them. Here
    they ramp linearly from (1, 0) to (r_max, d_max) over ``warmup_steps`` training steps,
    counted in ``num_batches_tracked`` (0 = no ramp).

    A subclass of ``nn.BatchNorm2d``: BN's parameters, buffers, state dict and eval, so
    tools that recalibrate BN's statistics (``torch.optim.swa_utils.update_bn``) take it
    too. The running statistics are BN's (the unbiased ``running_var``), and sigma_run =
    sqrt(running_var + eps); the paper's Algorithm 1 averages sigma itself.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, r_max: float = 3.0, d_max: float = 5.0,
                 warmup_steps: int = 0) -> None:
        super().__init__(**_batchnorm_arguments(num_features, eps, momentum, affine))
        self.r_max = _number("r_max", r_max, low=1.0)
        self.d_max = _number("d_max", d_max, low=0.0)
        self.warmup_steps = coerce("warmup_steps", warmup_steps, int)
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps", f"warmup_steps must be >= 0, got {warmup_steps}")

    def limits(self) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """(r_max, d_max) in force for the next training step: the warm-up's linear ramp
        from (1, 0) at step 0 to the full values from step ``warmup_steps`` on."""
        if self.warmup_steps == 0:
            return self.r_max, self.d_max
        # A tensor, not .item(): no host sync per layer and step on an accelerator.
        frac = (self.num_batches_tracked.float() / self.warmup_steps).clamp(max=1.0)
        return 1.0 + (self.r_max - 1.0) * frac, self.d_max * frac

    @torch.no_grad()
    def corrections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (r, d) the batch x gets, each of shape (C,), from its statistics and the
        running statistics as they are before this step's update. No gradient."""
        var_b, mu_b = torch.var_mean(x.float(), dim=_not_channels(x), unbiased=False)  # (C,)
        sigma_b = torch.sqrt(var_b + self.eps)
        sigma_run = torch.sqrt(self.running_var + self.eps)
        r_max, d_max = self.limits()
        r = torch.clamp(sigma_b / sigma_run, 1.0 / r_max, r_max)
        d = torch.clamp((mu_b - self.running_mean) / sigma_run, -d_max, d_max)
        return r, d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if not self.training:
            return super().forward(xf).to(x.dtype)  # the running statistics, as BN
        r, d = self.corrections(xf)  # before the count and the running statistics move
        self.num_batches_tracked.add_(1)
        # BN's running-average factor; momentum None (as update_bn sets it) is a cumulative
        # average over the batches counted, as in nn.BatchNorm2d.
        momentum = (self.momentum if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked))
        # gamma * (x_hat * r + d) + beta = (gamma * r) * x_hat + (beta + gamma * d): BN with
        # a corrected scale and shift. F.batch_norm normalises with the batch statistics
        # and then updates the running ones. With r = 1 and d = 0 the scale and shift are
        # gamma and beta bit for bit, hence exactly BatchNorm.
        if self.affine:
            scale, shift = self.weight * r, self.bias + self.weight * d
        else:
            scale, shift = r, d
        y = F.batch_norm(xf, self.running_mean, self.running_var, scale, shift,
                         True, momentum, self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup_steps={self.warmup_steps}")


class BatchRenorm1d(BatchRenorm2d):
    """:class:`BatchRenorm2d` over feature vectors (B, C), as ``nn.BatchNorm1d`` is
    ``nn.BatchNorm2d`` over them (the same statistics per channel, over the batch)."""

    _check_input_dim = nn.BatchNorm1d._check_input_dim


class GhostBatchNorm2d(nn.BatchNorm2d):
    """Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017, "Train longer, generalize
    better", arXiv:1705.08741).

    Training splits the batch into chunks of ``virtual_batch`` images (the last one smaller
    when the batch does not divide) and normalises each chunk with its own statistics: the
    noise of BN's statistics at a small batch, with the optimizer still seeing the whole
    batch. The running statistics are updated once per chunk, as BN applied to each chunk
    in turn would (and ``num_batches_tracked`` counts chunks). Eval is BatchNorm's eval.
    A subclass of ``nn.BatchNorm2d``: the same parameters, buffers and state dict.
    """

    def __init__(self, num_features: int, virtual_batch: int = 8, eps: float = 1e-5,
                 momentum: float = 0.1, affine: bool = True) -> None:
        super().__init__(**_batchnorm_arguments(num_features, eps, momentum, affine))
        self.virtual_batch = _positive_int("virtual_batch", virtual_batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if not self.training:
            return super().forward(xf).to(x.dtype)
        # (B, C, H, W) -> chunks (b, C, H, W) with b = virtual_batch (the last one <=);
        # BN's forward on each: its own statistics, one running-statistics update each.
        outputs = []
        for chunk in xf.split(self.virtual_batch):
            outputs.append(super().forward(chunk))
        return torch.cat(outputs).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch={self.virtual_batch}"


class GhostBatchNorm1d(GhostBatchNorm2d):
    """:class:`GhostBatchNorm2d` over feature vectors (B, C)."""

    _check_input_dim = nn.BatchNorm1d._check_input_dim


class NoisyBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm followed by random, time-varying noise: Santurkar, Tsipras, Ilyas & Madry
    2018, "How Does Batch Normalization Help Optimization?" (NeurIPS), section 2.1 and
    Figure 2, "noisy BatchNorm".

    The paper's question: if BN helps by keeping each layer's input distribution steady
    (reducing "internal covariate shift"), a BN whose output distribution is shifted and
    rescaled at random at every step should lose that help. Training applies, after BN,

        y = s * BN(x) + m,   s = 1 + (scale - 1) * (2 * u1 - 1),   m = shift * (2 * u2 - 1)

    with u1, u2 ~ U(0, 1) drawn anew at every training step for every channel (one draw
    per channel and step, shared by the batch and the positions): each channel's output
    distribution moves at every step, its mean by up to ``shift`` and its scale within
    [2 - scale, scale]. Over the steps the noise averages to none (E[s] = 1, E[m] = 0), so
    eval, which is BatchNorm's eval without noise, sees the network trained on average.
    (Drawn with E[s] > 1, as from U(1, scale), it does not: on the seed's network at shift
    1 and scale 2 the test accuracy fell to chance while the noisy training accuracy
    reached 95%.) The noise is drawn from torch's generator (a seed fixes it, a checkpoint
    keeps it) and no gradient flows into it. With ``shift = 0`` and ``scale = 1`` it is
    BatchNorm exactly. The paper draws its noise per activation; normlab draws it per
    channel, which moves the distribution of the next layer's input, the quantity the
    question is about, and is not averaged away over a channel's positions.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, shift: float = 0.5, scale: float = 1.5) -> None:
        super().__init__(**_batchnorm_arguments(num_features, eps, momentum, affine))
        self.shift = _number("shift", shift, low=0.0)
        self.scale = _number("scale", scale, low=1.0)
        if self.scale >= 2.0:  # s would reach 0 or flip the sign
            raise ConfigError("scale", f"scale must be in [1.0, 2.0), got {self.scale}")

    def noise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's (s, m), each of shape (C,), drawn from torch's generator."""
        u = torch.rand(2, self.num_features, device=x.device)
        return 1.0 + (self.scale - 1.0) * (2.0 * u[0] - 1.0), self.shift * (2.0 * u[1] - 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = super().forward(xf)
        if not self.training or (self.shift == 0 and self.scale == 1):
            return y.to(x.dtype)
        s, m = self.noise(xf)
        view = (1, -1) + (1,) * (xf.dim() - 2)  # per channel, over (B, C) or (B, C, H, W)
        return (y * s.view(view) + m.view(view)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shift={self.shift}, scale={self.scale}"


class NoisyBatchNorm1d(NoisyBatchNorm2d):
    """:class:`NoisyBatchNorm2d` over feature vectors (B, C)."""

    _check_input_dim = nn.BatchNorm1d._check_input_dim


class EvoNormB0(nn.Module):
    """EvoNorm-B0 (Liu, Brock, Simonyan & Le 2020, "Evolving Normalization-Activation
    Layers", arXiv:2004.02967): a batch-dependent norm and activation in one,

        y = x / max(sqrt(var_B + eps), v * x + sqrt(var_I + eps)) * gamma + beta,

    var_B the batch variance per channel over (B, H, W) (the running variance in eval),
    var_I the instance variance per image and channel over (H, W). No mean is subtracted.
    Matches timm's ``EvoNorm2dB0`` (defaults eps = 1e-3, momentum = 0.1; the running
    variance is an exponential average of the unbiased batch variance, as BN's).
    """

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features = C = _positive_int("num_features", num_features)
        self.eps = _number("eps", eps, low=0.0, low_open=True)
        self.momentum = _number("momentum", momentum, low=0.0, high=1.0)
        self.weight = nn.Parameter(torch.ones(C))   # gamma
        self.bias = nn.Parameter(torch.zeros(C))    # beta
        self.v = nn.Parameter(torch.ones(C))
        self.register_buffer("running_var", torch.ones(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.training:
            var = xf.var(dim=(0, 2, 3), unbiased=False)  # (C,), with gradient, as in BN
            n = xf.numel() / xf.shape[1]                  # values per channel, B*H*W
            with torch.no_grad():  # the running average gets the unbiased variance
                self.running_var.copy_(self.running_var * (1 - self.momentum)
                                       + var * self.momentum * (n / (n - 1)))
        else:
            var = self.running_var
        batch_std = _channel_view(torch.sqrt(var + self.eps))  # (1, C, 1, 1)
        # v * x plus the instance std over (H, W), per image and channel: (B, C, H, W).
        right = xf * _channel_view(self.v) + _instance_std(xf, self.eps)
        y = xf / torch.maximum(batch_std, right)
        return (y * _channel_view(self.weight) + _channel_view(self.bias)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


# --- per-image statistics -------------------------------------------------------------------

class FilterResponseNorm2d(nn.Module):
    """Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan
    2020, "Filter Response Normalization Layer", arXiv:1911.09737):

        nu2 = mean over (H, W) of x^2,   y = gamma * x / sqrt(nu2 + eps) + beta,
        z = max(y, tau)

    per image and channel. No mean is subtracted, so the output can sit far from zero; the
    TLU's learned threshold tau (the paper's stand-in for the ReLU after BN) lets the layer
    learn where to cut. With ``learnable_eps`` the epsilon is ``eps + |eps_learned|``, a
    learned scalar starting at 1e-4 as in TensorFlow Addons' implementation (the paper
    learns eps where H*W is small, e.g. 1x1 maps, where a fixed eps can dominate nu2).

    Matches timm's ``FilterResponseNormTlu2d`` at the same eps. The default eps here is the
    paper's 1e-6; timm's default is 1e-5.
    """

    def __init__(self, num_features: int, eps: float = 1e-6, learnable_eps: bool = False
                 ) -> None:
        super().__init__()
        self.num_features = C = _positive_int("num_features", num_features)
        self.eps = _number("eps", eps, low=0.0, low_open=True)
        self.learnable_eps = coerce("learnable_eps", learnable_eps, bool)
        self.weight = nn.Parameter(torch.ones(C))   # gamma
        self.bias = nn.Parameter(torch.zeros(C))    # beta
        self.tau = nn.Parameter(torch.zeros(C))     # the TLU's threshold
        self.eps_learned = nn.Parameter(torch.tensor(1e-4)) if self.learnable_eps else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        nu2 = xf.square().mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        eps = self.eps if self.eps_learned is None else self.eps + self.eps_learned.abs()
        y = xf * torch.rsqrt(nu2 + eps)
        y = y * _channel_view(self.weight) + _channel_view(self.bias)
        return torch.maximum(y, _channel_view(self.tau)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, learnable_eps={self.learnable_eps}"


class EvoNormS0(nn.Module):
    """EvoNorm-S0 (Liu, Brock, Simonyan & Le 2020, arXiv:2004.02967): a batch-independent
    norm and activation in one, a SiLU-like gate over a group standard deviation,

        y = x * sigmoid(v * x) / sqrt(var_G + eps) * gamma + beta,

    var_G the variance per image over each group of C / groups channels and (H, W), as
    GroupNorm's (but no mean is subtracted from x). Matches timm's ``EvoNorm2dS0`` with the
    same ``groups`` (timm's default is 32 groups; the seed's network has 8-16 channels, so
    the default here is normlab's usual 2).
    """

    def __init__(self, num_features: int, groups: int = 2, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = C = _positive_int("num_features", num_features)
        self.groups = _positive_int("groups", groups)
        if C % self.groups:
            raise ConfigError("groups", f"groups ({self.groups}) must divide the number of "
                                        f"channels ({C})")
        self.eps = _number("eps", eps, low=0.0, low_open=True)
        self.weight = nn.Parameter(torch.ones(C))   # gamma
        self.bias = nn.Parameter(torch.zeros(C))    # beta
        self.v = nn.Parameter(torch.ones(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        B, C, H, W = xf.shape
        G = self.groups
        gated = xf * torch.sigmoid(xf * _channel_view(self.v))  # (B, C, H, W)
        # Viewed as (B, G, C/G, H, W): the variance over each group's channels and positions.
        var = xf.reshape(B, G, C // G, H, W).var(dim=(2, 3, 4), unbiased=False, keepdim=True)
        y = gated.reshape(B, G, C // G, H, W) / torch.sqrt(var + self.eps)  # var: (B, G, 1, 1, 1)
        y = y.reshape(B, C, H, W)
        return (y * _channel_view(self.weight) + _channel_view(self.bias)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}"


class RMSNorm2d(nn.Module):
    """RMSNorm over conv maps (Zhang & Sennrich 2019, "Root Mean Square Layer
    Normalization", arXiv:1910.07467): LayerNorm's statistics without the mean,

        y = x / sqrt(mean over (C, H, W) of x^2 + eps) * gamma,

    per image, with a per-channel scale gamma (initialised to 1) and no shift; on feature
    vectors (B, C) the mean is over C, which is ``torch.nn.RMSNorm(C)``. ``eps=None``
    is float32's machine epsilon, as ``torch.nn.RMSNorm`` takes the dtype's (the statistic is
    computed in float32 here, so that is float32's even for bfloat16 input).
    """

    def __init__(self, num_features: int, eps: float | None = None) -> None:
        super().__init__()
        self.num_features = C = _positive_int("num_features", num_features)
        self.eps = None if eps is None else _number("eps", eps, low=0.0, low_open=True)
        self.weight = nn.Parameter(torch.ones(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        eps = torch.finfo(torch.float32).eps if self.eps is None else self.eps
        mean_square = xf.square().mean(dim=tuple(range(1, x.dim())), keepdim=True)  # (B, 1..)
        y = xf * torch.rsqrt(mean_square + eps) * _channel_view(self.weight, x.dim())
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


# --- weight standardization -------------------------------------------------------------------

class StdConv2d(nn.Conv2d):
    """A convolution with Weight Standardization (Qiao, Wang, Liu, Shen & Yuille 2019,
    "Micro-Batch Training with Batch-Channel Normalization and Weight Standardization",
    arXiv:1903.10520): before each use, every output filter's weights are standardised,

        w_hat = (w - mean(w)) / sqrt(var(w) + eps),

    mean and (biased) variance over the filter's (C_in, kH, kW) weights. Takes
    ``nn.Conv2d``'s arguments plus ``eps``; the stored weight stays the raw one. Matches
    timm's ``StdConv2d`` (eps = 1e-6 inside the square root; the paper's code divides by
    the unbiased std + 1e-5). Unlike timm's, padding and bias default as in nn.Conv2d.
    """

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = _number("eps", eps, low=0.0, low_open=True)

    def standardized_weight(self) -> torch.Tensor:
        """The weight the convolution uses, (C_out, C_in / groups, kH, kW)."""
        w = self.weight.float()
        var, mean = torch.var_mean(w, dim=(1, 2, 3), unbiased=False, keepdim=True)
        return ((w - mean) / torch.sqrt(var + self.eps)).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nn.Conv2d's own forward with the standardised weight (it honours padding_mode).
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"
