"""Where everything goes: sheet names, the shared columns, :class:`Grid` (an (N, C, H, W) tensor
placed on a sheet), :func:`workbook_layout` (every address the workbook uses) and the A1
ranges that cover a group of cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from openpyxl.utils import get_column_letter

from normlab.models.norms import norm_spec
from normlab.workbook.config import Index, SheetConfig
from normlab.workbook.partition import Group, reduction_groups, workbook_norms

INPUTS_SHEET = "Inputs"
CHECK_SHEET = "Check"

# Columns shared by every sheet: A = image / group labels, B = row labels, C.. = the grid.
LABEL_COL, ROWLABEL_COL, GRID_LEFT = 1, 2, 3
# Stats table columns (under the grid, same sheet): label in A, then these.
COUNT_COL, MEAN_COL, VAR_COL, STD_COL = 2, 3, 4, 5


def _addr(row: int, col: int, absolute: bool = False) -> str:
    letter = get_column_letter(col)
    return f"${letter}${row}" if absolute else f"{letter}{row}"


def _abs(ref: str) -> str:
    letters = ref.rstrip("0123456789")
    return f"${letters}${ref[len(letters):]}"


@dataclass(frozen=True)
class Grid:
    """Where an (N, C, H, W) tensor sits on a sheet; the channel header is the row above."""

    top: int
    left: int
    shape: tuple[int, int, int, int]

    def row(self, n: int, h: int) -> int:
        return self.top + n * self.shape[2] + h

    def col(self, c: int, w: int) -> int:
        return self.left + c * self.shape[3] + w

    def cell(self, n: int, c: int, h: int, w: int) -> str:
        return _addr(self.row(n, h), self.col(c, w))

    @property
    def bottom(self) -> int:
        return self.top + self.shape[0] * self.shape[2] - 1

    @property
    def right(self) -> int:
        return self.left + self.shape[1] * self.shape[3] - 1

    @property
    def ref(self) -> str:
        return f"{_addr(self.top, self.left)}:{_addr(self.bottom, self.right)}"

    def indices(self) -> list[Index]:
        batch, chans, height, width = self.shape
        return [
            (n, c, h, w)
            for n in range(batch)
            for h in range(height)
            for c in range(chans)
            for w in range(width)
        ]


@dataclass(frozen=True)
class NormLayout:
    sheet: str
    groups: tuple[Group, ...]
    x: Grid  # x again (formulas pointing at Inputs), coloured by group
    stats_top: int  # row of the first group's statistics
    y: Grid  # the normalised outputs

    def mean_cell(self, k: int) -> str:
        return _addr(self.stats_top + k, MEAN_COL)

    def var_cell(self, k: int) -> str:
        return _addr(self.stats_top + k, VAR_COL)


@dataclass(frozen=True)
class Layout:
    """Every address the workbook uses; tests and writers read positions from here only."""

    eps: str
    gamma: tuple[str, ...]
    beta: tuple[str, ...]
    x: Grid
    norms: dict[str, NormLayout]
    check_values: dict[str, Grid]
    check_diffs: dict[str, Grid]
    max_diff: dict[str, str]


# Inputs sheet rows
_EPS_ROW, _PARAM_HEADER_ROW, _GAMMA_ROW, _BETA_ROW, _X_HEADER_ROW = 6, 8, 9, 10, 12
_TEXT_ROWS = 3  # explanatory lines under each sheet's title
_CHECK_SUMMARY_HEADER = 6


def workbook_layout(config: SheetConfig) -> Layout:
    shape = config.shape
    nh = config.batch * config.height
    channel_cols = [GRID_LEFT + c * config.width for c in range(config.channels)]
    norms = {}
    shown = workbook_norms()
    for key in shown:
        groups = tuple(reduction_groups(key, config))
        x = Grid(top=_TEXT_ROWS + 5, left=GRID_LEFT, shape=shape)  # label, header, then grid
        stats_top = x.bottom + 4  # blank, label, header
        y_top = stats_top + len(groups) + 3  # blank, label, header
        y = Grid(y_top, GRID_LEFT, shape)
        norms[key] = NormLayout(norm_spec(key).title, groups, x, stats_top, y)
    check_values, check_diffs = {}, {}
    row = _CHECK_SUMMARY_HEADER + len(shown) + 2  # summary table, blank
    for key in shown:
        check_values[key] = Grid(row + 2, GRID_LEFT, shape)  # label, header, grid
        check_diffs[key] = Grid(row + nh + 5, GRID_LEFT, shape)  # blank, label, header, grid
        row += 2 * nh + 6
    max_diff = {
        key: _addr(_CHECK_SUMMARY_HEADER + 1 + i, MEAN_COL) for i, key in enumerate(shown)
    }
    return Layout(
        eps=_addr(_EPS_ROW, GRID_LEFT),
        gamma=tuple(_addr(_GAMMA_ROW, col) for col in channel_cols),
        beta=tuple(_addr(_BETA_ROW, col) for col in channel_cols),
        x=Grid(_X_HEADER_ROW + 1, GRID_LEFT, shape),
        norms=norms,
        check_values=check_values,
        check_diffs=check_diffs,
        max_diff=max_diff,
    )


def _rectangles(cells: Sequence[tuple[int, int]]) -> list[str]:
    """Cover a set of (row, col) cells exactly with few A1 ranges (rows of runs, then stacked)."""
    by_row: dict[int, list[int]] = {}
    for r, c in sorted(set(cells)):
        by_row.setdefault(r, []).append(c)
    runs: dict[int, list[tuple[int, int]]] = {}
    for r, cols in by_row.items():
        row_runs, start = [], cols[0]
        for a, b in zip(cols, [*cols[1:], None], strict=True):
            if b != a + 1:
                row_runs.append((start, a))
                start = b
        runs[r] = row_runs
    # Stack identical runs on consecutive rows into one rectangle.
    rects: list[list[int]] = []  # [top, bottom, left, right]
    open_rects: dict[tuple[int, int], list[int]] = {}
    for r in sorted(runs):
        still_open = {}
        for run in runs[r]:
            rect = open_rects.get(run)
            if rect is not None and rect[1] == r - 1:
                rect[1] = r
            else:
                rect = [r, r, *run]
                rects.append(rect)
            still_open[run] = rect
        open_rects = still_open
    out = []
    for top, bottom, left, right in rects:
        a, b = _addr(top, left), _addr(bottom, right)
        out.append(a if a == b else f"{a}:{b}")
    return out
