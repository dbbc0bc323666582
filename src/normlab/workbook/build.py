"""Build the normalization workbook: BN, LN, GN and IN as live spreadsheet formulas.

Every (N, C, H, W) tensor in the workbook is drawn the same way: one block of H rows per
image, and inside it one block of W columns per channel (N=3, C=4, H=W=2 shown):

              channel 0   channel 1   channel 2   channel 3
    image 0   x x         x x         x x         x x        <- row 0
              x x         x x         x x         x x        <- row 1
    image 1   ...

A norm is nothing but a partition of those N*C*H*W cells into groups that share one mean and
one variance. ``reduction_groups`` is the only place that knows each norm's partition;
``workbook_layout`` decides where everything goes; ``_write_norm_sheet`` writes any partition.
So the four norm sheets come from one writer, and adding a norm means adding one key function.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from openpyxl import Workbook
from openpyxl.styles import Alignment, Border, Font, PatternFill, Side
from openpyxl.utils import get_column_letter
from openpyxl.worksheet.pagebreak import Break
from openpyxl.worksheet.worksheet import Worksheet

from normlab.files import atomic_write
from normlab.models.norms import NORM_TITLES, NORMALIZING

Index = tuple[int, int, int, int]  # (n, c, h, w)

INPUTS_SHEET = "Inputs"
CHECK_SHEET = "Check"

# A workbook is for reading by eye: refuse tensors nobody would read (and formulas that would
# grow past spreadsheet argument limits).
MAX_SIZE = 32
MAX_VALUES = 4096
INPUT_LOW, INPUT_HIGH = -4, 4  # the seed's spreadsheet used random integers in [-4, 4]

# Columns shared by every sheet: A = image / group labels, B = row labels, C.. = the grid.
LABEL_COL, ROWLABEL_COL, GRID_LEFT = 1, 2, 3
# Stats table columns (under the grid, same sheet): label in A, then these.
COUNT_COL, MEAN_COL, VAR_COL, STD_COL = 2, 3, 4, 5


# --------------------------------------------------------------------------- configuration


def _check_int(name: str, value: object, low: int = 1, high: int | None = MAX_SIZE) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(
            f"{name}={value} is too large for a workbook meant to be read by eye (at most {high})"
        )
    return value


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SheetConfig:
    """Everything one workbook is made from; validated on construction (ValueError if bad).

    ``gamma``/``beta`` are the per-channel scale and shift written into the editable cells of
    ``Inputs`` (default 1 and 0; ``None`` means the default).
    """

    batch: int = 3
    channels: int = 4
    height: int = 2
    width: int = 2
    groups: int = 2
    eps: float = 1e-5
    seed: int = 0
    gamma: tuple[float, ...] | None = field(default=None)
    beta: tuple[float, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        for name in ("batch", "channels", "height", "width", "groups"):
            _check_int(name, getattr(self, name))
        values = self.batch * self.channels * self.height * self.width
        if values > MAX_VALUES:
            raise ValueError(
                f"batch*channels*height*width = {values} values is too many for a workbook "
                f"meant to be read by eye (at most {MAX_VALUES})"
            )
        if self.channels % self.groups:
            divisors = [g for g in range(1, self.channels + 1) if self.channels % g == 0]
            raise ValueError(
                f"groups={self.groups} does not divide channels={self.channels}: GroupNorm needs "
                f"equal groups of channels; choose one of {', '.join(map(str, divisors))}"
            )
        eps = _check_real("eps", self.eps)
        if eps <= 0:
            raise ValueError(f"eps must be > 0 (it keeps sqrt(var + eps) away from 0), got {eps}")
        object.__setattr__(self, "eps", eps)
        _check_int("seed", self.seed, low=0, high=None)
        for name, default in (("gamma", 1.0), ("beta", 0.0)):
            given = getattr(self, name)
            if given is None:
                resolved = (default,) * self.channels
            else:
                resolved = tuple(_check_real(f"{name}[{i}]", v) for i, v in enumerate(given))
                if len(resolved) != self.channels:
                    raise ValueError(
                        f"{name} needs one value per channel ({self.channels}), got {len(resolved)}"
                    )
            object.__setattr__(self, name, resolved)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.height, self.width)


def input_tensor(config: SheetConfig) -> torch.Tensor:
    """The workbook's x: integers in [-4, 4] from ``torch.Generator().manual_seed(seed)``.

    Returned as float64 (N, C, H, W); the same seed always gives the same values.
    """
    gen = torch.Generator().manual_seed(config.seed)
    x = torch.randint(INPUT_LOW, INPUT_HIGH + 1, config.shape, generator=gen)
    return x.to(torch.float64)


# --------------------------------------------------------------------------- the norms as data


@dataclass(frozen=True)
class Group:
    """One set of (n, c, h, w) positions that share a mean and a variance."""

    label: str
    members: tuple[Index, ...]


def _span(lo: int, hi: int) -> str:
    return f"{lo}–{hi}" if hi > lo else f"{lo}"


def _group_keys(config: SheetConfig) -> dict[str, Callable[[int, int], tuple[object, str]]]:
    """norm -> function (n, c) -> (group key, label). Statistics never depend on (h, w)."""
    n_img, chans = config.batch, config.channels
    per = chans // config.groups

    def gn(n: int, c: int) -> tuple[object, str]:
        g = c // per
        return (n, g), f"image {n} · group {g} (channels {_span(g * per, g * per + per - 1)})"

    return {
        "bn": lambda n, c: (c, f"channel {c} (images {_span(0, n_img - 1)})"),
        "ln": lambda n, c: (n, f"image {n} (channels {_span(0, chans - 1)})"),
        "gn": gn,
        "in": lambda n, c: ((n, c), f"image {n} · channel {c}"),
    }


def reduction_groups(norm: str, config: SheetConfig) -> list[Group]:
    """The groups of positions whose values ``norm`` averages together, in reading order.

    BN: per channel over the batch; LN: per image over all channels; GN: per image per group
    of channels; IN: per image per channel. Each group spans all (h, w) of its (n, c) pairs.
    """
    keys = _group_keys(config)
    if norm not in keys:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(keys)}")
    key_of = keys[norm]
    batch, chans, height, width = config.shape
    labels: dict[object, str] = {}
    members: dict[object, list[Index]] = {}
    for n in range(batch):
        for c in range(chans):
            key, label = key_of(n, c)
            labels.setdefault(key, label)
            members.setdefault(key, []).extend(
                (n, c, h, w) for h in range(height) for w in range(width)
            )
    return [Group(labels[k], tuple(members[k])) for k in members]


@dataclass(frozen=True)
class NormText:
    averages: str
    why: str
    torch_call: str


NORM_TEXT: dict[str, NormText] = {
    "bn": NormText(
        "Averages over: for each channel, that channel's values in every image of the batch "
        "(N·H·W values per channel).",
        "Why: one feature detector (channel) should have the same scale across examples; the "
        "price is that an image's output depends on the other images in its batch.",
        "F.batch_norm(x, None, None, γ, β, training=True, eps=ε)   (this batch's statistics)",
    ),
    "ln": NormText(
        "Averages over: for each image, all its channels and positions (C·H·W values per image).",
        "Why: every image is normalised on its own, so nothing depends on the batch or its size. "
        "Like the seed (GroupNorm with 1 group), γ and β are per channel.",
        "F.layer_norm(x, (C, H, W), eps=ε) without affine, then · γ[c] + β[c] per channel",
    ),
    "gn": NormText(
        "Averages over: for each image, each group of C/G consecutive channels "
        "(C/G·H·W values per group).",
        "Why: between LayerNorm (1 group) and InstanceNorm (one group per channel): independent "
        "of the batch, yet channels that behave differently need not share statistics.",
        "F.group_norm(x, G, γ, β, eps=ε)",
    ),
    "in": NormText(
        "Averages over: for each image and each channel, its H·W positions (one feature map).",
        "Why: every feature map of every image gets its own mean and variance, which removes "
        "per-image contrast; it is GroupNorm with one group per channel.",
        "F.instance_norm(x, weight=γ, bias=β, eps=ε)",
    ),
}


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


# --------------------------------------------------------------------------- layout


def _addr(row: int, col: int, absolute: bool = False) -> str:
    letter = get_column_letter(col)
    return f"${letter}${row}" if absolute else f"{letter}{row}"


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
    for key in NORMALIZING:
        groups = tuple(reduction_groups(key, config))
        x = Grid(top=_TEXT_ROWS + 5, left=GRID_LEFT, shape=shape)  # label, header, then grid
        stats_top = x.bottom + 4  # blank, label, header
        y_top = stats_top + len(groups) + 3  # blank, label, header
        y = Grid(y_top, GRID_LEFT, shape)
        norms[key] = NormLayout(NORM_TITLES[key], groups, x, stats_top, y)
    check_values, check_diffs = {}, {}
    row = _CHECK_SUMMARY_HEADER + len(NORMALIZING) + 2  # summary table, blank
    for key in NORMALIZING:
        check_values[key] = Grid(row + 2, GRID_LEFT, shape)  # label, header, grid
        check_diffs[key] = Grid(row + nh + 5, GRID_LEFT, shape)  # blank, label, header, grid
        row += 2 * nh + 6
    max_diff = {
        key: _addr(_CHECK_SUMMARY_HEADER + 1 + i, MEAN_COL) for i, key in enumerate(NORMALIZING)
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


# --------------------------------------------------------------------------- styles

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


# --------------------------------------------------------------------------- sheets


def _write_inputs(ws: Worksheet, config: SheetConfig, layout: Layout, x: torch.Tensor) -> None:
    n, c, h, w = config.shape
    _heading(ws, f"Inputs: the activations x, shape (N, C, H, W) = ({n}, {c}, {h}, {w})", [
        "Yellow cells are yours to edit (any x, ε, γ or β); every other sheet recalculates.",
        f"x holds integers in [{INPUT_LOW}, {INPUT_HIGH}] from torch.randint with "
        f"torch.Generator().manual_seed({config.seed}): `normlab sheet --seed {config.seed}` "
        "gives them back.",
        "Each image is a block of rows; inside it, each channel is a block of columns. "
        "Then see the BatchNorm, LayerNorm, GroupNorm, InstanceNorm and Check sheets.",
    ])
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

    title = norm.sheet + (f" with G = {config.groups} groups" if key == "gn" else "")
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


def _abs(ref: str) -> str:
    letters = ref.rstrip("0123456789")
    return f"${letters}${ref[len(letters):]}"


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
    for i, key in enumerate(NORMALIZING):
        row, title = header + 1 + i, layout.norms[key].sheet
        diffs = layout.check_diffs[key]
        ws.cell(row=row, column=LABEL_COL, value=title).font = _BOLD
        worst = ws[layout.max_diff[key]]
        worst.value, worst.number_format = f"=MAX({diffs.ref})", _SMALL
        worst.alignment = _CENTER
        ws.cell(row=row, column=STD_COL,
                value=f'=IF({layout.max_diff[key]}<1E-9,"match","differs")').alignment = _CENTER
        ws.cell(row=row, column=STD_COL + 1, value=NORM_TEXT[key].torch_call)

    for key in NORMALIZING:
        title, y = layout.norms[key].sheet, layout.norms[key].y
        values, diffs = layout.check_values[key], layout.check_diffs[key]
        torch_y = outputs[key]
        if key != NORMALIZING[0]:  # one norm per printed page
            ws.row_breaks.append(Break(id=values.top - 3))
        _text(ws, values.top - 2, f"{title}: PyTorch's y = {NORM_TEXT[key].torch_call}", _BOLD)
        _grid(ws, values, lambda i, t=torch_y: float(t[i]))
        _text(ws, diffs.top - 2, f"{title}: |{title} sheet's y − PyTorch's y|", _BOLD)
        _grid(ws, diffs,
              lambda i, y=y, v=values, s=title: f"=ABS({s}!{y.cell(*i)}-{v.cell(*i)})",
              number_format=_SMALL)
    _finish(ws, layout.x.right, one_page=False)  # page breaks above: one norm per page


def build_workbook(config: SheetConfig) -> Workbook:
    """The whole workbook in memory (nothing is written)."""
    layout = workbook_layout(config)
    x = input_tensor(config)
    wb = Workbook()
    inputs = wb.active
    inputs.title = INPUTS_SHEET
    _write_inputs(inputs, config, layout, x)
    for key in NORMALIZING:
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
