"""The sheet writers: ``Inputs`` (the editable x, eps, gamma and beta) and one norm sheet, which
``_write_norm_sheet`` writes for any partition, so the four norm sheets come from one writer.
"""

from __future__ import annotations

import torch
from openpyxl.styles import PatternFill
from openpyxl.worksheet.worksheet import Worksheet

from normlab.models.norms import norm_spec
from normlab.workbook.config import INPUT_HIGH, INPUT_LOW, Index, SheetConfig
from normlab.workbook.layout import (
    _BETA_ROW,
    _EPS_ROW,
    _GAMMA_ROW,
    _PARAM_HEADER_ROW,
    _X_HEADER_ROW,
    COUNT_COL,
    GRID_LEFT,
    INPUTS_SHEET,
    LABEL_COL,
    MEAN_COL,
    STD_COL,
    VAR_COL,
    Layout,
    _abs,
    _addr,
    _rectangles,
)
from normlab.workbook.partition import NORM_TEXT, left_out_note, workbook_norms
from normlab.workbook.styles import (
    _BOLD,
    _CENTER,
    _EDIT_FILL,
    _HEADER_FILL,
    _NUMBER,
    _TITLE_FONT,
    _block_border,
    _channel_header,
    _finish,
    _grid,
    _group_fill,
    _heading,
    _text,
)


def _write_inputs(ws: Worksheet, config: SheetConfig, layout: Layout, x: torch.Tensor) -> None:
    n, c, h, w = config.shape
    _heading(ws, f"Inputs: the activations x, shape (N, C, H, W) = ({n}, {c}, {h}, {w})", [
        "Yellow cells are yours to edit (any x, ε, γ or β); every other sheet recalculates.",
        f"x holds integers in [{INPUT_LOW}, {INPUT_HIGH}] from torch.randint with "
        f"torch.Generator().manual_seed({config.seed}): `normlab sheet --seed {config.seed}` "
        "gives them back.",
        "Each image is a block of rows; inside it, each channel is a block of columns. "
        f"Then see the {', '.join(layout.norms[k].sheet for k in workbook_norms())} and "
        "Check sheets.",
    ])
    note = left_out_note()
    if note:  # the row between the text and ε
        _text(ws, _EPS_ROW - 1, note)
    _text(ws, _EPS_ROW, "ε (epsilon, added to the variance)", _BOLD)
    eps = ws[layout.eps]
    eps.value, eps.fill, eps.alignment = config.eps, _EDIT_FILL, _CENTER
    eps.border = _block_border(0, 0, 1, 1)

    _text(ws, _PARAM_HEADER_ROW, "per-channel scale and shift", _BOLD)
    _channel_header(ws, layout.x, row=_PARAM_HEADER_ROW)
    for row, label, values, refs in (
        (_GAMMA_ROW, "γ (gamma, scale)", config.gamma, layout.gamma),
        (_BETA_ROW, "β (beta, shift)", config.beta, layout.beta),
    ):
        _text(ws, row, label, _BOLD)
        for ch, (value, ref) in enumerate(zip(values, refs, strict=True)):
            cell = ws[ref]
            cell.value, cell.fill, cell.alignment = value, _EDIT_FILL, _CENTER
            for col in range(layout.x.col(ch, 0), layout.x.col(ch, w - 1) + 1):
                ws.cell(row=row, column=col).border = _block_border(0, col - cell.column, 1, w)
            if w > 1:
                ws.merge_cells(start_row=row, start_column=cell.column,
                               end_row=row, end_column=cell.column + w - 1)

    _text(ws, _X_HEADER_ROW, "x", _TITLE_FONT)
    _grid(ws, layout.x, lambda i: int(x[i]), fill_of=lambda i: _EDIT_FILL, number_format="General")
    _finish(ws, layout.x.right)


def _write_norm_sheet(ws: Worksheet, key: str, config: SheetConfig, layout: Layout) -> None:
    """Lay out one norm: x coloured by group, each group's statistics, then the outputs."""
    norm, text, inputs = layout.norms[key], NORM_TEXT[key], layout.x
    group_of: dict[Index, int] = {m: k for k, g in enumerate(norm.groups) for m in g.members}

    def fill_of(i: Index) -> PatternFill:
        return _group_fill(group_of[i])

    title = norm.sheet + (f" with G = {config.groups} groups" if norm_spec(key).grouped else "")
    _heading(ws, title, [
        text.averages,
        text.why,
        "Then y = (x − mean) / √(variance + ε) · γ + β, with the population variance "
        "(VARP: divide by the count), as PyTorch normalises; ε, γ and β come from Inputs.",
    ])

    _text(ws, norm.x.top - 2,
          "x (from Inputs): one colour per group of values that share a mean and a variance",
          _BOLD)
    _grid(ws, norm.x, lambda i: f"={INPUTS_SHEET}!{inputs.cell(*i)}", fill_of=fill_of,
          number_format="General")

    header = norm.stats_top - 1
    _text(ws, header - 1,
          "Statistics of each group: AVERAGE and VARP over exactly that group's cells of Inputs",
          _BOLD)
    for col, name in ((LABEL_COL, "group"), (COUNT_COL, "count"), (MEAN_COL, "mean"),
                      (VAR_COL, "variance"), (STD_COL, "√(var + ε)")):
        cell = ws.cell(row=header, column=col, value=name)
        cell.font, cell.fill, cell.alignment = _BOLD, _HEADER_FILL, _CENTER
    eps_abs = f"{INPUTS_SHEET}!{_addr(_EPS_ROW, GRID_LEFT, absolute=True)}"
    for k, group in enumerate(norm.groups):
        row = norm.stats_top + k
        cells = [(inputs.row(n, h), inputs.col(c, w)) for n, c, h, w in group.members]
        ranges = ",".join(f"{INPUTS_SHEET}!{r}" for r in _rectangles(cells))
        formulas = {
            COUNT_COL: f"=COUNT({ranges})",
            MEAN_COL: f"=AVERAGE({ranges})",
            VAR_COL: f"=VARP({ranges})",
            STD_COL: f"=SQRT({norm.var_cell(k)}+{eps_abs})",
        }
        ws.cell(row=row, column=LABEL_COL, value=group.label).fill = _group_fill(k)
        for col, formula in formulas.items():
            cell = ws.cell(row=row, column=col, value=formula)
            cell.fill, cell.alignment = _group_fill(k), _CENTER
            cell.number_format = "0" if col == COUNT_COL else _NUMBER

    _text(ws, norm.y.top - 2, "y = (x − mean) / √(variance + ε) · γ + β, laid out like x", _BOLD)

    def output(i: Index) -> str:
        k, c = group_of[i], i[1]
        row = norm.stats_top + k
        mean, var = _addr(row, MEAN_COL, absolute=True), _addr(row, VAR_COL, absolute=True)
        gamma, beta = (f"{INPUTS_SHEET}!{_abs(ref)}" for ref in (layout.gamma[c], layout.beta[c]))
        return f"=({INPUTS_SHEET}!{inputs.cell(*i)}-{mean})/SQRT({var}+{eps_abs})*{gamma}+{beta}"

    _grid(ws, norm.y, output, fill_of=fill_of)
    _finish(ws, norm.y.right)
