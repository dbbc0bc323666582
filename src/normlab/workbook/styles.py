"""How the sheets look: fills, fonts, borders, and the helpers that write headings, tensor grids
and page setup in the same style on every sheet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from openpyxl.styles import Alignment, Border, Font, PatternFill, Side
from openpyxl.utils import get_column_letter
from openpyxl.worksheet.worksheet import Worksheet

from normlab.workbook.config import Index
from normlab.workbook.layout import (
    _TEXT_ROWS,
    GRID_LEFT,
    LABEL_COL,
    ROWLABEL_COL,
    STD_COL,
    Grid,
)

_EDIT_FILL = PatternFill("solid", fgColor="FFF2CC")  # editable cells: pale yellow
_HEADER_FILL = PatternFill("solid", fgColor="D9D9D9")
# ColorBrewer Pastel1 + Pastel2 without their yellows (yellow means "editable").
_GROUP_COLOURS = (
    "FBB4AE", "B3CDE3", "CCEBC5", "DECBE4", "FED9A6", "E5D8BD",
    "FDDAEC", "B3E2CD", "FDCDAC", "CBD5E8", "F4CAE4", "E6F5C9",
)
_TITLE_FONT = Font(bold=True, size=14)
_BOLD = Font(bold=True)
_NOTE_FONT = Font(italic=True, color="404040")
_CENTER = Alignment(horizontal="center", vertical="center")
_THIN, _MEDIUM = Side(style="thin", color="A0A0A0"), Side(style="medium", color="000000")
_NUMBER = "0.000"
_SMALL = "0.0E+00"
_ONE_PAGE_ROWS = 60


def _group_fill(k: int) -> PatternFill:
    return PatternFill("solid", fgColor=_GROUP_COLOURS[k % len(_GROUP_COLOURS)])


def _block_border(h: int, w: int, height: int, width: int) -> Border:
    """Thin inside a channel block, a heavy line around each (image, channel) block."""
    return Border(
        left=_MEDIUM if w == 0 else _THIN,
        right=_MEDIUM if w == width - 1 else _THIN,
        top=_MEDIUM if h == 0 else _THIN,
        bottom=_MEDIUM if h == height - 1 else _THIN,
    )


def _text(ws: Worksheet, row: int, value: str, font: Font | None = None) -> None:
    cell = ws.cell(row=row, column=LABEL_COL, value=value)
    if font is not None:
        cell.font = font


def _heading(ws: Worksheet, title: str, lines: Sequence[str]) -> None:
    _text(ws, 1, title, _TITLE_FONT)
    ws.row_dimensions[1].height = 22
    for i, line in enumerate(lines[:_TEXT_ROWS]):
        _text(ws, 2 + i, line)


def _channel_header(ws: Worksheet, grid: Grid, row: int | None = None) -> None:
    row = grid.top - 1 if row is None else row
    width = grid.shape[3]
    for c in range(grid.shape[1]):
        col = grid.col(c, 0)
        cell = ws.cell(row=row, column=col, value=f"channel {c}")
        cell.font, cell.alignment, cell.fill = _BOLD, _CENTER, _HEADER_FILL
        if width > 1:
            ws.merge_cells(start_row=row, start_column=col, end_row=row, end_column=col + width - 1)


def _grid(
    ws: Worksheet,
    grid: Grid,
    value_of: Callable[[Index], object],
    *,
    fill_of: Callable[[Index], PatternFill | None] = lambda i: None,
    number_format: str = _NUMBER,
) -> None:
    """Write a tensor grid: channel header, image / row labels, one cell per (n, c, h, w)."""
    batch, _, height, width = grid.shape
    _channel_header(ws, grid)
    for n in range(batch):
        for h in range(height):
            row = grid.row(n, h)
            label = ws.cell(row=row, column=ROWLABEL_COL, value=f"row {h}")
            label.alignment, label.font = _CENTER, _NOTE_FONT
        top = grid.row(n, 0)
        name = ws.cell(row=top, column=LABEL_COL, value=f"image {n}")
        name.font, name.alignment = _BOLD, Alignment(vertical="center")
        if height > 1:
            ws.merge_cells(start_row=top, start_column=LABEL_COL,
                           end_row=top + height - 1, end_column=LABEL_COL)
    for idx in grid.indices():
        n, c, h, w = idx
        cell = ws.cell(row=grid.row(n, h), column=grid.col(c, w), value=value_of(idx))
        cell.number_format = number_format
        cell.alignment = _CENTER
        cell.border = _block_border(h, w, height, width)
        fill = fill_of(idx)
        if fill is not None:
            cell.fill = fill


def _finish(ws: Worksheet, last_col: int, *, one_page: bool = True) -> None:
    ws.column_dimensions[get_column_letter(LABEL_COL)].width = 27
    ws.column_dimensions[get_column_letter(ROWLABEL_COL)].width = 8
    for col in range(GRID_LEFT, max(last_col, STD_COL) + 1):
        ws.column_dimensions[get_column_letter(col)].width = 10
    ws.freeze_panes = "C2"  # keep the title row and the image / row labels in view
    ws.page_setup.orientation = ws.ORIENTATION_LANDSCAPE
    ws.page_setup.paperSize = ws.PAPERSIZE_A4
    ws.page_setup.fitToWidth = 1
    # One page when that stays legible, else one page wide and as many tall as needed.
    ws.page_setup.fitToHeight = 1 if ws.max_row <= _ONE_PAGE_ROWS and one_page else 0
    ws.sheet_properties.pageSetUpPr.fitToPage = True
    ws.print_options.horizontalCentered = True
    ws.page_margins.left = ws.page_margins.right = 0.4
