"""The one config object of a run, saved beside every result it produced."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from normlab.accel import ACCEL, PRECISIONS, default_precision
from normlab.fields import ConfigError, check_keys, coerce
from normlab.models import ModelConfig, build_model
from normlab.models.config import KERNELS, MODEL_KEYS, default_kernels
from normlab.probes import EVERY as PROBE_EVERY
from normlab.probes import parse_probes
from normlab.training.protocols import PROTOCOLS, Protocol, protocol_fields, resolve_protocol

L1_SCOPES = ("all", "conv")
REGULARIZER_KEYS = ("l1", "l1_scope", "weight_decay")
__all__ = ["PRECISIONS", "RunConfig", "default_precision", "from_stored"]


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run's numbers: the data, the model, the protocol, the
    regularizers and the seed. (The device and thread count are recorded beside it in
    config.json, but are not part of the identity that resume compares.)

    Built with a bad value it raises :class:`~normlab.fields.ConfigError` naming the field;
    :meth:`from_dict` is the one way raw values (config.json, a suite's TOML) become a config.
    """

    dataset: str = "mnist"
    model: ModelConfig = field(default_factory=ModelConfig)
    protocol: Protocol = field(default_factory=lambda: PROTOCOLS["seed"])
    l1: float = 0.0  # lambda of lambda * sum |w|, added to the loss once per step
    l1_scope: str = "all"  # "all" parameters, like the seed, or "conv" weights only
    weight_decay: float = 0.0  # L2, through the optimiser
    seed: int = 1
    subset: int | None = None  # first N training images, for quick checks
    precision: str = field(default_factory=default_precision)  # "fp32" | "bf16" (autocast)
    # what rotates and normalises the training images on a CPU: normlab's C kernel (one
    # pass; the default where a C compiler is on the PATH) or "aten" (torch's affine_grid +
    # grid_sample, as normlab 0.4 and before did); they may pick another neighbour for a
    # pixel whose source is within float32 rounding of a half-way point
    augment: str = field(default_factory=default_kernels)
    # "on": the step normlab.accel prepares (the same numbers as autograd on the same
    # modules; the kernels as ModelConfig.kernels says); "off": the plain model through
    # autograd with torch's norms and augmentation (kernels, eval_kernels and augment
    # become "aten"). A stored config without the field (0.8 and before) reads as "on".
    accel: str = "on"
    # after each epoch's test pass, a second one with the batch-statistics norms' running
    # statistics recalibrated on training batches (PreciseBN: normlab.studies.precise);
    # metrics.jsonl gets test_acc_precise and test_loss_precise, the other metrics unchanged
    precise_bn: bool = False
    # "inductor": the steps the hand step does not take (normlab.accel.left_to_autograd: the
    # zoo's norms, your own, weight standardization, every network but the seed's) and their
    # test passes run under torch.compile (normlab.accel.compiled), whose numbers agree with
    # autograd's to rounding; "off": autograd. None: inductor where it applies, was measured
    # to pay (normlab.accel.compiled.SPEEDUP) and a C++ compiler is found ($NORMLAB_COMPILE
    # sets another default); where it does not apply it is "off". Written only when
    # "inductor": a stored config without it (0.11 and before, whose steps went through
    # autograd) reads as "off".
    compile: str | None = None
    # what the run records inside the network every ``probe_every`` training steps
    # (normlab.probes: "activations", "weights", "gradients"), into probes.jsonl; empty: no
    # probes. They change no number the run computes. Written only when set: a stored
    # config without them (0.12 and before) reads as none.
    probe: tuple[str, ...] = ()
    probe_every: int = PROBE_EVERY
    # stop the run as diverged when its test accuracy is at chance after an epoch (once
    # CHANCE_MIN_STEPS steps are done): right for a study of accuracy, wrong for one of
    # trainability, where a slow starter must get its whole budget. A nan or inf loss
    # stops a run either way. Written only when off: a stored config without it (0.14 and
    # before) reads as on.
    stop_at_chance: bool = True

    def __post_init__(self) -> None:
        from normlab.accel import left_to_autograd
        from normlab.accel.compiled import COMPILE, default_compile
        from normlab.data import DATASETS

        if self.accel not in ACCEL:
            raise ConfigError("accel", f"accel must be one of {', '.join(ACCEL)}, "
                                       f"got {self.accel!r}")
        if self.accel == "off":
            object.__setattr__(self, "augment", "aten")
            object.__setattr__(self, "model", dataclasses.replace(
                self.model, kernels="aten", eval_kernels="aten"))
        if self.compile is not None and self.compile not in COMPILE:
            raise ConfigError("compile", f"compile must be one of {', '.join(COMPILE)}, "
                                         f"got {self.compile!r}")
        applies = self.accel == "on" and left_to_autograd(self.model) is not None
        object.__setattr__(self, "compile",
                           (self.compile or default_compile(self.model)) if applies else "off")

        if self.dataset not in DATASETS:
            raise ConfigError("dataset", f"unknown dataset {self.dataset!r}; "
                                         f"choose one of {', '.join(DATASETS)}")
        for key in ("l1", "weight_decay"):
            value = coerce(key, getattr(self, key), float)
            if value < 0:
                raise ConfigError(key, f"{key} must be a number >= 0, got {value!r}")
            object.__setattr__(self, key, value)
        if self.l1_scope not in L1_SCOPES:
            raise ConfigError("l1_scope", f"l1_scope must be one of {', '.join(L1_SCOPES)}, "
                                          f"got {self.l1_scope!r}")
        if self.augment not in KERNELS:
            raise ConfigError("augment", f"augment must be one of {', '.join(KERNELS)}, "
                                         f"got {self.augment!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError("precision", f"precision must be one of {', '.join(PRECISIONS)}, "
                                           f"got {self.precision!r}")
        coerce("precise_bn", self.precise_bn, bool)
        coerce("stop_at_chance", self.stop_at_chance, bool)
        object.__setattr__(self, "probe", parse_probes(self.probe))
        every = coerce("probe_every", self.probe_every, int)
        if every < 1:
            raise ConfigError("probe_every", f"probe_every must be a number of steps >= 1, "
                                             f"got {self.probe_every!r}")
        object.__setattr__(self, "probe_every", every)
        if coerce("seed", self.seed, int) < 0:
            raise ConfigError("seed", f"seed must be a non-negative integer, got {self.seed}")
        if coerce("subset", self.subset, int, optional=True) is not None and self.subset < 1:
            raise ConfigError("subset", f"subset must be a positive number of training "
                                        f"images, got {self.subset!r}")

    @property
    def norm(self) -> str:
        return self.model.norm

    def make_model(self) -> nn.Module:
        """The run's network, freshly initialised from torch's global generator."""
        return build_model(self.model)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"] = self.model.to_dict()
        if self.accel == "on":  # written only when off: the format 0.8 and before wrote
            del data["accel"]
        if not self.precise_bn:  # written only when on: the format 0.9 and before wrote
            del data["precise_bn"]
        if self.compile == "off":  # written only when on: the format 0.11 and before wrote
            del data["compile"]
        if self.stop_at_chance:  # written only when off: the format 0.14 and before wrote
            del data["stop_at_chance"]
        if self.probe:  # written only when set: the format 0.12 and before wrote
            data["probe"] = list(self.probe)
        else:
            del data["probe"], data["probe_every"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """A config from its dict: config.json as this version writes it (``model`` nested),
        as normlab 0.1 wrote it (``norm``, ``groups``, ``dropout`` at the top), or a suite's
        variant. The protocol may be a Protocol or a dict holding its ``name`` and fields."""
        data = dict(data)
        check_keys(data, [*(f.name for f in dataclasses.fields(cls)), *MODEL_KEYS],
                   "run config key")
        flat = {k: data.pop(k) for k in MODEL_KEYS if k in data}
        model = data.pop("model", None)
        if model is None:
            model = ModelConfig.from_dict(flat)
        elif isinstance(model, dict):
            model = ModelConfig.from_dict({**model, **flat})
        proto = data.pop("protocol", PROTOCOLS["seed"])
        if isinstance(proto, dict):
            proto = dict(proto)
            proto = resolve_protocol(proto.pop("name", "seed"), proto)
        return cls(model=model, protocol=proto, **data)

    @classmethod
    def from_options(cls, protocol: str = "seed", **options: Any) -> RunConfig:
        """A config from ``normlab train``'s options, flat, as the command line and
        ``normlab.train`` take them: the run's fields (``norm``, ``groups``, ``dropout``,
        ``dropout_draw``, ``kernels``, ``dataset``, ``l1``, ``l1_scope``, ``weight_decay``,
        ``seed``, ``subset``, ``precision``, ``augment``, ``accel``, ``precise_bn``,
        ``compile``, ``probe``, ``probe_every``, ``stop_at_chance``) and any
        field of the named ``protocol`` (``epochs``, ``lr``, ...). An option given as None
        keeps its default."""
        run_keys = [*MODEL_KEYS, *(f.name for f in dataclasses.fields(cls)
                                   if f.name not in ("model", "protocol"))]
        proto_keys = [f.name for f in protocol_fields()]
        given = {k: v for k, v in options.items() if v is not None}
        check_keys(given, [*run_keys, *proto_keys], "option")
        fields = {k: v for k, v in given.items() if k in proto_keys}
        return cls.from_dict({**{k: v for k, v in given.items() if k in run_keys},
                              "protocol": {"name": protocol, **fields}})


def from_stored(data: dict[str, Any]) -> RunConfig:
    """A config as stored by any normlab version (config.json's "run", a suite.json variant's
    config). Stored before ``dropout_draw`` existed (normlab 0.1), the dropout masks were
    nn.Dropout's: such a config reads as ``dropout_draw="bernoulli"``; stored before
    ``kernels`` existed (normlab 0.3 and before), the norms were torch's: it reads as
    ``kernels="aten"``; without a precision (normlab 0.1) as fp32; without ``augment``
    (normlab 0.4 and before) as ``augment="aten"``; and without ``eval_kernels`` (normlab
    0.5 and before: the test pass used torch's norms) as ``eval_kernels="aten"``; without
    ``precise_bn`` (0.9 and before) as off; without ``compile`` (0.11 and before: autograd)
    as off. So a run resumes and reports exactly as it was trained, on any machine."""
    data = {"precision": "fp32", "augment": "aten", "compile": "off", **data}
    model = data.get("model")
    if isinstance(model, dict):
        data["model"] = {"dropout_draw": "bernoulli", "kernels": "aten",
                         "eval_kernels": "aten", **model}
    elif model is None:
        data.setdefault("dropout_draw", "bernoulli")
        data.setdefault("kernels", "aten")
        data.setdefault("eval_kernels", "aten")
    return RunConfig.from_dict(data)


# (a difference that says an older normlab, or another machine, wrote a run: what continues it)
CONTINUE_HINTS = (
    ("dropout_draw: 'bernoulli'",
     "it was trained with nn.Dropout masks (normlab 0.1): --dropout-draw bernoulli "
     "continues it"),
    ("kernels: 'aten' -> 'normlab'",
     "its norms were torch's (normlab 0.3 or before): --kernels aten continues it"),
    ("kernels: 'normlab' -> 'aten'",
     "its norms were normlab's C kernels: --kernels normlab continues it (with a C "
     "compiler on the PATH)"),
    ("eval_kernels: 'aten' -> 'normlab'",
     "its test passes used torch's norms (normlab 0.5 or before): --eval-kernels aten "
     "continues it"),
    ("eval_kernels: 'normlab' -> 'aten'",
     "its test passes used normlab's kernels: --eval-kernels normlab continues it (with a C "
     "compiler on the PATH)"),
    ("augment: 'aten' -> 'normlab'",
     "its training images were rotated by torch's ops (normlab 0.4 or before): "
     "--augment aten continues it"),
    ("augment: 'normlab' -> 'aten'",
     "its training images were rotated by normlab's C kernel: --augment normlab continues "
     "it (with a C compiler on the PATH)"),
    ("compile: None -> 'inductor'",
     "its steps went through autograd (normlab 0.11 or before, or compile off): --compile "
     "off continues it"),
    ("compile: 'inductor' -> None",
     "its steps ran under torch.compile: --compile inductor continues it (with a C++ "
     "compiler on the PATH)"),
    ("probe: None -> ",
     "it was trained without probes: leave --probe out to continue it (or start the probed "
     "run in another --out)"),
    ("probe: [",
     "it was trained with probes: the same --probe continues it"),
    ("precision: 'fp32' -> 'bf16'",
     "it was trained in fp32 (normlab 0.3 or before, or another machine's default): "
     "--precision fp32 continues it"),
    ("precision: 'bf16' -> 'fp32'",
     "it was trained with bf16 autocast (the default on a CPU with AMX or AVX512-BF16): "
     "--precision bf16 continues it"),
)


def continue_hint(diffs: list[str]) -> str:
    """"; <hint>" for each config difference (``config_diff``'s lines) that a flag undoes
    (a marker matches a whole field name: ``kernels`` is not ``eval_kernels``)."""
    return "".join(f"; {text}" for marker, text in CONTINUE_HINTS
                   if any(re.search(rf"(?<!\w){re.escape(marker)}", d) for d in diffs))


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two config dicts."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs
