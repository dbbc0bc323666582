"""Build the normalization workbook: BN, LN, GN and IN (every registered norm with a formula,
:func:`~normlab.workbook.partition.workbook_norms`) as live spreadsheet formulas.

Every (N, C, H, W) tensor in the workbook is drawn the same way: one block of H rows per
image, and inside it one block of W columns per channel (N=3, C=4, H=W=2 shown):

              channel 0   channel 1   channel 2   channel 3
    image 0   x x         x x         x x         x x        <- row 0
              x x         x x         x x         x x        <- row 1
    image 1   ...

A norm is nothing but a partition of those N*C*H*W cells into groups that share one mean and
one variance. ``reduction_groups`` is the only place that knows each norm's partition;
``workbook_layout`` decides where everything goes; ``_write_norm_sheet`` writes any partition.
So the four norm sheets come from one writer, and a norm's partition is its NormSpec's formula.

This module puts the workbook together (:func:`build_workbook`, :func:`write_workbook`) from:

- :mod:`normlab.workbook.config`: :class:`SheetConfig` and the seeded :func:`input_tensor`;
- :mod:`normlab.workbook.partition`: :func:`reduction_groups` and each norm's explanation;
- :mod:`normlab.workbook.layout`: :class:`Grid` and :func:`workbook_layout`, every address;
- :mod:`normlab.workbook.styles`: the look shared by every sheet;
- :mod:`normlab.workbook.sheets`: the ``Inputs`` and norm sheet writers;
- :mod:`normlab.workbook.check`: :func:`torch_outputs` and the ``Check`` sheet.

Their public names stay importable from here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from openpyxl import Workbook

from normlab.files import atomic_write
from normlab.workbook.check import _write_check, torch_outputs
from normlab.workbook.config import (
    INPUT_HIGH,
    INPUT_LOW,
    MAX_SIZE,
    MAX_VALUES,
    Index,
    SheetConfig,
    input_tensor,
)
from normlab.workbook.layout import (
    CHECK_SHEET,
    COUNT_COL,
    GRID_LEFT,
    INPUTS_SHEET,
    LABEL_COL,
    MEAN_COL,
    ROWLABEL_COL,
    STD_COL,
    VAR_COL,
    Grid,
    Layout,
    NormLayout,
    workbook_layout,
)
from normlab.workbook.partition import (
    NORM_TEXT,
    Group,
    NormText,
    left_out,
    left_out_note,
    reduction_groups,
    workbook_norms,
)
from normlab.workbook.sheets import _write_inputs, _write_norm_sheet

# Everything public that lived here before the split, by the module it lives in now.
__all__ = ["build_workbook", "write_workbook"]
__all__ += [  # config
    "INPUT_HIGH", "INPUT_LOW", "MAX_SIZE", "MAX_VALUES", "Index", "SheetConfig", "input_tensor",
]
__all__ += ["NORM_TEXT", "Group", "NormText", "left_out", "left_out_note",  # partition
            "reduction_groups", "workbook_norms"]
__all__ += [  # layout
    "CHECK_SHEET", "COUNT_COL", "GRID_LEFT", "INPUTS_SHEET", "LABEL_COL", "MEAN_COL",
    "ROWLABEL_COL", "STD_COL", "VAR_COL", "Grid", "Layout", "NormLayout", "workbook_layout",
]
__all__ += ["torch_outputs"]  # check


def build_workbook(config: SheetConfig) -> Workbook:
    """The whole workbook in memory (nothing is written)."""
    layout = workbook_layout(config)
    x = input_tensor(config)
    wb = Workbook()
    inputs = wb.active
    inputs.title = INPUTS_SHEET
    _write_inputs(inputs, config, layout, x)
    for key in workbook_norms():
        _write_norm_sheet(wb.create_sheet(layout.norms[key].sheet), key, config, layout)
    _write_check(wb.create_sheet(CHECK_SHEET), config, layout, x)
    wb.calculation.fullCalcOnLoad = True  # Excel: compute everything when the file is opened
    return wb


def write_workbook(
    path: str | os.PathLike[str],
    batch: int = 3,
    channels: int = 4,
    height: int = 2,
    width: int = 2,
    groups: int = 2,
    eps: float = 1e-5,
    seed: int = 0,
    *,
    gamma: Sequence[float] | None = None,
    beta: Sequence[float] | None = None,
) -> Path:
    """Write the workbook to ``path`` (an .xlsx) and return it as a Path.

    Everything is validated first: bad sizes, a group count that does not divide the
    channels, or eps <= 0 raise ValueError and leave no file behind.
    """
    path = Path(path)
    if path.suffix.lower() != ".xlsx":
        raise ValueError(f"the workbook must be an .xlsx file, got {str(path)!r}")
    config = SheetConfig(
        batch, channels, height, width, groups, eps, seed,
        gamma=None if gamma is None else tuple(gamma),
        beta=None if beta is None else tuple(beta),
    )
    wb = build_workbook(config)
    return atomic_write(path, wb.save)  # never a half-written workbook under the real name
