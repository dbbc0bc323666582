"""Print a torchinfo summary of a model: its layers, output shapes and parameter count.

Examples:
  normlab summary                      # the seed's default: BatchNorm, dropout 0.01
  normlab summary --norm gn --groups 2
  normlab summary --norm ln --dropout 0
"""

from __future__ import annotations

import argparse

from normlab.models.net import DROPOUT_DRAWS, KERNELS, ModelConfig, Net
from normlab.models.norms import NORMS


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--norm", default="bn", choices=list(NORMS),
        help="normalization after every conv block (default: %(default)s)",
    )
    group.add_argument(
        "--groups", type=int, default=2,
        help="GroupNorm groups; must divide 8, 16, 12 and 14 (default: %(default)s)",
    )
    group.add_argument(
        "--dropout", type=float, default=0.01,
        help="dropout after every conv block, in [0, 1); 0 turns it off (default: %(default)s)",
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
                                  "eval_kernels": args.eval_kernels})


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=1,
                        help="batch size shown in the table (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from torchinfo import summary

    model = Net.from_config(model_config_from_args(args))
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
