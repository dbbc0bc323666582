"""Write an xlsx workbook that computes BatchNorm, LayerNorm, GroupNorm and InstanceNorm
with live formulas, so a student can check every mean, variance and output by hand.

Sheets:
  Inputs        the activations x (N, C, H, W): seeded integers in [-4, 4], one block of rows
                per image and one block of columns per channel; editable eps, gamma, beta
  BatchNorm     per channel over the batch      (each sheet: x coloured by group, AVERAGE
  LayerNorm     per image over all channels      and VARP of each group, then every
  GroupNorm     per image per group of channels  y = (x - mean) / sqrt(var + eps) * gamma
  InstanceNorm  per image per channel            + beta, all as formulas on Inputs)
  Check         PyTorch's outputs (float64) as values, and the largest |sheet - PyTorch|

Editing any yellow cell in Excel or LibreOffice recalculates everything.

Examples:
  normlab sheet --out normalizations.xlsx
  normlab sheet --out gn3.xlsx --batch 2 --channels 6 --height 3 --width 2 --groups 3
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="the .xlsx file to write")
    shape = parser.add_argument_group("tensor and norms")
    shape.add_argument("--batch", type=int, default=3, help="images N (default: %(default)s)")
    shape.add_argument("--channels", type=int, default=4,
                       help="channels C (default: %(default)s)")
    shape.add_argument("--height", type=int, default=2, help="rows H (default: %(default)s)")
    shape.add_argument("--width", type=int, default=2, help="columns W (default: %(default)s)")
    shape.add_argument("--groups", type=int, default=2,
                       help="GroupNorm groups G; must divide C (default: %(default)s)")
    shape.add_argument("--eps", type=float, default=1e-5,
                       help="epsilon added to the variance, > 0 (default: %(default)s)")
    shape.add_argument("--seed", type=int, default=0,
                       help="seed of torch.Generator that draws x (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from normlab.workbook.build import write_workbook

    path = write_workbook(
        args.out, batch=args.batch, channels=args.channels, height=args.height,
        width=args.width, groups=args.groups, eps=args.eps, seed=args.seed,
    )
    from normlab.models.norms import norm_spec
    from normlab.workbook.partition import left_out_note, workbook_norms

    sheets = ", ".join(["Inputs", *(norm_spec(k).title for k in workbook_norms()), "Check"])
    print(f"wrote {path}: sheets {sheets}")
    note = left_out_note()
    if note:
        print(note)
    return 0
