"""The PyTorch reference: :func:`torch_outputs` (PyTorch's own BN / LN / GN / IN of the same x)
and the ``Check`` sheet that compares every norm sheet's y with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from openpyxl.worksheet.pagebreak import Break
from openpyxl.worksheet.worksheet import Worksheet

from normlab.workbook.config import SheetConfig, input_tensor
from normlab.workbook.layout import _CHECK_SUMMARY_HEADER, LABEL_COL, MEAN_COL, STD_COL, Layout
from normlab.workbook.partition import NORM_TEXT, workbook_norms
from normlab.workbook.styles import (
    _BOLD,
    _CENTER,
    _HEADER_FILL,
    _SMALL,
    _finish,
    _grid,
    _heading,
    _text,
)


def torch_outputs(config: SheetConfig, x: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """PyTorch's own BN / LN / GN / IN of ``x`` (default: the seeded input), in float64."""
    x = input_tensor(config) if x is None else x.to(torch.float64)
    gamma = torch.tensor(config.gamma, dtype=torch.float64)
    beta = torch.tensor(config.beta, dtype=torch.float64)
    eps = config.eps
    per_channel = (1, -1, 1, 1)
    return {
        "bn": F.batch_norm(x, None, None, gamma, beta, training=True, eps=eps),
        # F.layer_norm's own affine would be one γ/β per (c, h, w) element; the seed's LN
        # (GroupNorm(1, C)) has one per channel, so normalise without affine and apply it here.
        "ln": F.layer_norm(x, x.shape[1:], eps=eps) * gamma.view(per_channel)
        + beta.view(per_channel),
        "gn": F.group_norm(x, config.groups, gamma, beta, eps=eps),
        "in": F.instance_norm(x, weight=gamma, bias=beta, eps=eps),
    }


def _write_check(ws: Worksheet, config: SheetConfig, layout: Layout, x: torch.Tensor) -> None:
    outputs = torch_outputs(config, x)
    _heading(ws, "Check: the same outputs from PyTorch (float64), pasted as plain numbers", [
        "Each norm sheet's y should equal PyTorch's to about 1e-15: the table shows the largest "
        "difference for each norm.",
        "PyTorch's numbers are fixed: they were computed from x, ε, γ and β as generated. "
        "Edit Inputs and they go stale, so the differences grow (expected).",
        "Rerun `normlab sheet` with the same options to refresh them.",
    ])
    header = _CHECK_SUMMARY_HEADER
    names = {LABEL_COL: "norm", MEAN_COL: "largest |y − PyTorch|", STD_COL: "verdict",
             STD_COL + 1: "PyTorch call"}
    for col in range(LABEL_COL, STD_COL + 2):
        cell = ws.cell(row=header, column=col, value=names.get(col))
        cell.font, cell.fill = _BOLD, _HEADER_FILL
    shown = workbook_norms()
    for i, key in enumerate(shown):
        row, title = header + 1 + i, layout.norms[key].sheet
        diffs = layout.check_diffs[key]
        ws.cell(row=row, column=LABEL_COL, value=title).font = _BOLD
        worst = ws[layout.max_diff[key]]
        worst.value, worst.number_format = f"=MAX({diffs.ref})", _SMALL
        worst.alignment = _CENTER
        ws.cell(row=row, column=STD_COL,
                value=f'=IF({layout.max_diff[key]}<1E-9,"match","differs")').alignment = _CENTER
        ws.cell(row=row, column=STD_COL + 1, value=NORM_TEXT[key].torch_call)

    for key in shown:
        title, y = layout.norms[key].sheet, layout.norms[key].y
        values, diffs = layout.check_values[key], layout.check_diffs[key]
        torch_y = outputs[key]
        if key != shown[0]:  # one norm per printed page
            ws.row_breaks.append(Break(id=values.top - 3))
        _text(ws, values.top - 2, f"{title}: PyTorch's y = {NORM_TEXT[key].torch_call}", _BOLD)
        _grid(ws, values, lambda i, t=torch_y: float(t[i]))
        _text(ws, diffs.top - 2, f"{title}: |{title} sheet's y − PyTorch's y|", _BOLD)
        _grid(ws, diffs,
              lambda i, y=y, v=values, s=title: f"=ABS({s}!{y.cell(*i)}-{v.cell(*i)})",
              number_format=_SMALL)
    _finish(ws, layout.x.right, one_page=False)  # page breaks above: one norm per page
