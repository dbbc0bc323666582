"""Print a torchinfo summary of a model: its layers, output shapes and parameter count.

Examples:
  normlab summary                      # the seed's default: BatchNorm, dropout 0.01
  normlab summary --norm gn --groups 2
  normlab summary --norm ln --dropout 0
  normlab summary --norm gn --weight-std
  normlab summary --norm bn --norm-option momentum=0.01 --norm-option affine=false
  normlab summary --norm mypkg.norms:MyNorm       # your own norm, by import path
  normlab summary --net resnet --net-option depth=20               # 269,434 parameters
  normlab summary --net mlp --norm bn             # the BN paper's MLP
  normlab summary --net mypkg.nets:MyNet --net-option width=32      # your own network
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from normlab.models.config import DROPOUT_DRAWS, KERNELS, ModelConfig
from normlab.models.nets import build_model, net_names
from normlab.models.norms import norm_names


def option_value(text: str) -> Any:
    """A ``--norm-option`` value, JSON-ish: ``0.01``, ``true``/``false`` (any case),
    ``null``/``none``, ``[1, 2]``, ``"quoted"``; anything else is a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def norm_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. momentum=0.01), got {text!r}")
    return key, option_value(value)


def norm_options_from_args(args: argparse.Namespace, key: str = "norm_options"
                           ) -> dict[str, Any] | None:
    """``--norm-option`` (``key="net_options"``: ``--net-option``) pairs as a dict (None
    when none was given)."""
    pairs = getattr(args, key, None)
    return dict(pairs) if pairs else None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--net", default=None, metavar="NET",
        help=f"the network: {', '.join(net_names())} (seed: the seed's CNN, the default; "
             "mlp: the BN paper's 784-100-100-100-10 sigmoid MLP; plain: a plain stack of "
             "3x3 conv -> norm -> ReLU; resnet: He et al.'s CIFAR ResNet), or your own by "
             "import path package.module:Attr (an nn.Module class called as "
             "Attr(norm_layer, **net_options), returning log-probabilities; importable "
             "wherever it trains)",
    )
    group.add_argument(
        "--net-option", dest="net_options", action="append", type=norm_option,
        default=None, metavar="KEY=VALUE",
        help="a keyword option of the network (repeatable): mlp hidden=[100,100,100] "
             "activation=sigmoid|relu; plain depth=20 width=16; resnet depth=20 (6n+2) "
             "width=16 residual_init=standard|skipinit|fixup",
    )
    group.add_argument(
        "--norm", default="bn", metavar="NORM",
        help=f"normalization after every conv block (or hidden layer): "
             f"{', '.join(norm_names())}, or your own norm by import path "
             "package.module:Attr (an nn.Module class called as Attr(channels, **options), "
             "or a NormSpec; importable wherever it trains) (default: %(default)s)",
    )
    group.add_argument(
        "--norm-option", dest="norm_options", action="append", type=norm_option,
        default=None, metavar="KEY=VALUE",
        help="a keyword option of every norm layer, passed to it unchanged (repeatable): "
             "--norm-option momentum=0.01 --norm-option eps=1e-3 --norm-option affine=false; "
             "values are JSON-ish (numbers, true/false, null, [lists]; else a string)",
    )
    group.add_argument(
        "--weight-std", action="store_true", default=None,
        help="weight standardization: every convolution standardizes its weights before "
             "use (StdConv2d; Qiao et al. 2019), e.g. with --norm gn",
    )
    group.add_argument(
        "--groups", type=int, default=2,
        help="groups of GroupNorm (and of the other grouped norms, EvoNorm-S0); must divide "
             "every width (the seed's CNN: 8, 16, 12 and 14) (default: %(default)s)",
    )
    group.add_argument(
        "--dropout", type=float, default=None,
        help="dropout after every conv block (other nets: after every hidden layer or "
             "block), in [0, 1); 0 turns it off (default: the net's, 0.01 for the seed's CNN, "
             "0 for the others)",
    )
    group.add_argument(
        "--dropout-draw", default="positions", choices=DROPOUT_DRAWS,
        help="how dropout masks are drawn, in the same distribution: positions (only the "
             "dropped units on a CPU, a mask drawn on the device on a GPU; fused into the "
             "norm: faster) or bernoulli (nn.Dropout, as the seed) (default: %(default)s)",
    )
    group.add_argument(
        "--kernels", default=None, choices=KERNELS,
        help="what computes each block's ReLU -> norm (BN, GN, LN, IN): normlab (the ReLU "
             "folded into the norm, and normlab's C kernels for channels-last CPU training, "
             "compiled on first use with the system's cc) or aten (torch's nn.ReLU and "
             "norm layers) (default: normlab where a C compiler is on the PATH, else aten)",
    )
    group.add_argument(
        "--eval-kernels", default=None, choices=KERNELS,
        help="what computes those blocks in the test pass, with --kernels normlab: normlab "
             "(the kernels too) or aten (torch's ReLU and norms, as normlab 0.5 and before "
             "evaluated: pass it to continue such a folder) (default: as --kernels)",
    )


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    """The model options as a (validated) ModelConfig."""
    return ModelConfig.from_dict({"norm": args.norm, "groups": args.groups,
                                  "dropout": args.dropout, "dropout_draw": args.dropout_draw,
                                  "kernels": args.kernels,
                                  "eval_kernels": args.eval_kernels,
                                  "norm_options": norm_options_from_args(args) or {},
                                  "weight_std": bool(args.weight_std),
                                  "net": args.net or "seed",
                                  "net_options": norm_options_from_args(args, "net_options")
                                  or {}})


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=1,
                        help="batch size shown in the table (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from torchinfo import summary

    model = build_model(model_config_from_args(args))
    stats = summary(
        model,
        input_size=(args.batch_size, 1, 28, 28),
        col_names=("input_size", "output_size", "num_params"),
        depth=3,
        row_settings=("var_names",),
        verbose=0,
    )
    print(stats)
    print(f"parameters: {stats.trainable_params:,}")
    return 0
