"""The normalization workbook: its layout and validation, and (with LibreOffice) that its
formulas really recalculate to PyTorch's BatchNorm / LayerNorm / GroupNorm / InstanceNorm."""

from __future__ import annotations

import itertools
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from openpyxl import load_workbook
from openpyxl.utils import range_boundaries

from conftest import require_tool
from normlab.cli import main
from normlab.models.norms import make_norm
from normlab.workbook import (
    Grid,
    SheetConfig,
    input_tensor,
    reduction_groups,
    torch_outputs,
    workbook_layout,
    workbook_norms,
    write_workbook,
)

TOL = 1e-6
GN3 = SheetConfig(batch=2, channels=6, height=3, width=2, groups=3)


# --------------------------------------------------------------------------- helpers


def expected_outputs(
    x: torch.Tensor, gamma, beta, eps: float, groups: int
) -> dict[str, torch.Tensor]:
    """The project's own norm layers (make_norm), in training mode and float64."""
    out = {}
    for key in workbook_norms():
        layer = make_norm(key, x.shape[1], groups).double().train()
        layer.eps = eps
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(gamma, dtype=torch.float64))
            layer.bias.copy_(torch.tensor(beta, dtype=torch.float64))
            out[key] = layer(x)
    return out


def expected_stats(x: torch.Tensor, key: str, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population variance of each group, in the stats table's order."""
    n, c = x.shape[:2]
    flat = {
        "bn": x.transpose(0, 1).reshape(c, -1),
        "ln": x.reshape(n, -1),
        "gn": x.reshape(n * groups, -1),
        "in": x.reshape(n * c, -1),
    }[key]
    return flat.mean(1), flat.var(1, unbiased=False)


def read_grid(ws, grid: Grid) -> torch.Tensor:
    values = [ws[grid.cell(*i)].value for i in itertools.product(*map(range, grid.shape))]
    bad = [v for v in values if not isinstance(v, (int, float))]
    assert not bad, f"{ws.title}!{grid.ref} holds non-numbers (not recalculated?): {bad[:3]}"
    return torch.tensor(values, dtype=torch.float64).view(grid.shape)


def cells_of(ranges: str) -> set[tuple[int, int]]:
    """All (row, col) cells named by 'Inputs!C13:D18,Inputs!C20' style arguments."""
    out = set()
    for part in ranges.split(","):
        sheet, _, ref = part.partition("!")
        assert sheet == "Inputs", part
        lo_col, lo_row, hi_col, hi_row = range_boundaries(ref)
        out |= {(r, c) for r in range(lo_row, hi_row + 1) for c in range(lo_col, hi_col + 1)}
    return out


def formula_args(formula: str, name: str) -> str:
    prefix = f"={name}("
    assert formula.startswith(prefix) and formula.endswith(")"), formula
    return formula[len(prefix):-1]


# --------------------------------------------------------------------------- without LibreOffice


@pytest.mark.parametrize("config", [SheetConfig(), GN3], ids=["3x4x2x2-g2", "2x6x3x2-g3"])
def test_reduction_groups_partition_every_position(config):
    everything = set(itertools.product(*map(range, config.shape)))
    n, c, h, w = config.shape
    sizes = {"bn": n * h * w, "ln": c * h * w, "gn": c // config.groups * h * w, "in": h * w}
    for key in workbook_norms():
        groups = reduction_groups(key, config)
        members = [m for g in groups for m in g.members]
        assert len(members) == len(set(members)) == len(everything), key
        assert set(members) == everything, key
        assert {len(g.members) for g in groups} == {sizes[key]}, key


def test_torch_outputs_match_the_projects_norm_layers():
    config = SheetConfig(batch=2, channels=6, height=3, width=2, groups=3, eps=0.1,
                         gamma=(2, -1, 0.5, 1, 3, -2), beta=(1, 0, -1, 0.5, 0, 2))
    x = input_tensor(config)
    want = expected_outputs(x, config.gamma, config.beta, config.eps, config.groups)
    got = torch_outputs(config)
    for key in workbook_norms():
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-12, msg=key)


def test_formula_cells_are_formulas_over_exactly_their_group(tmp_path):
    config = GN3
    wb = load_workbook(write_workbook(tmp_path / "f.xlsx", 2, 6, 3, 2, 3))
    layout = workbook_layout(config)
    inputs = layout.x
    for key in workbook_norms():
        norm = layout.norms[key]
        ws = wb[norm.sheet]
        for i in itertools.product(*map(range, config.shape)):
            assert ws[norm.x.cell(*i)].value == f"=Inputs!{inputs.cell(*i)}"
            y = ws[norm.y.cell(*i)].value
            assert isinstance(y, str) and y.startswith("="), (key, i, y)
            assert f"Inputs!{inputs.cell(*i)}" in y and "SQRT(" in y, y
            gamma = layout.gamma[i[1]]
            col, row = gamma.rstrip("0123456789"), gamma.lstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
            assert f"Inputs!${col}${row}" in y, y  # this channel's gamma
        for k, group in enumerate(norm.groups):
            want = {(inputs.row(n, h), inputs.col(c, w)) for n, c, h, w in group.members}
            mean = ws[norm.mean_cell(k)].value
            var = ws[norm.var_cell(k)].value
            assert cells_of(formula_args(mean, "AVERAGE")) == want, (key, k)
            assert cells_of(formula_args(var, "VARP")) == want, (key, k)
    check = wb["Check"]
    for key in workbook_norms():
        assert check[layout.max_diff[key]].value.startswith("=MAX(")
        for i in itertools.product(*map(range, config.shape)):
            pasted = check[layout.check_values[key].cell(*i)].value
            assert isinstance(pasted, (int, float)), (key, i, pasted)
            assert check[layout.check_diffs[key].cell(*i)].value.startswith("=ABS(")


def test_inputs_are_the_seeded_integers(tmp_path):
    layout = workbook_layout(SheetConfig())

    def inputs_of(seed: int, name: str) -> torch.Tensor:
        ws = load_workbook(write_workbook(tmp_path / name, seed=seed))["Inputs"]
        values = read_grid(ws, layout.x)
        assert all(isinstance(ws[layout.x.cell(*i)].value, int)
                   for i in itertools.product(*map(range, layout.x.shape)))
        assert ws[layout.eps].value == 1e-5
        assert [ws[g].value for g in layout.gamma] == [1] * 4
        assert [ws[b].value for b in layout.beta] == [0] * 4
        return values

    first, again, other = inputs_of(0, "a.xlsx"), inputs_of(0, "b.xlsx"), inputs_of(1, "c.xlsx")
    assert torch.equal(first, input_tensor(SheetConfig(seed=0)))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.min() >= -4 and first.max() <= 4 and first.unique().numel() > 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": 4, "groups": 3}, "groups=3 does not divide channels=4"),
        ({"batch": 0}, "batch must be at least 1"),
        ({"width": -2}, "width must be at least 1"),
        ({"height": 2.5}, "height must be an integer"),
        ({"eps": 0.0}, "eps must be > 0"),
        ({"eps": -1e-5}, "eps must be > 0"),
        ({"eps": math.nan}, "eps must be a finite number"),
        ({"gamma": [1, 2]}, "gamma needs one value per channel"),
        ({"batch": 33}, "too large"),
    ],
)
def test_bad_input_is_refused_before_any_file_is_written(tmp_path, kwargs, message):
    out = tmp_path / "bad.xlsx"
    with pytest.raises(ValueError, match=message):
        write_workbook(out, **kwargs)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_non_xlsx_path_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\.xlsx"):
        write_workbook(tmp_path / "norms.csv")
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_workbook_and_refuses_bad_groups(tmp_path, capsys):
    good, bad = tmp_path / "n.xlsx", tmp_path / "bad.xlsx"
    assert main(["sheet", "--out", str(good), "--seed", "3"]) == 0
    assert good.exists()
    assert main(["sheet", "--out", str(bad), "--channels", "4", "--groups", "3"]) == 2
    err = capsys.readouterr().err
    assert "normlab sheet: error: groups=3 does not divide channels=4" in err
    assert len(err.strip().splitlines()) == 1
    assert not bad.exists()


# --------------------------------------------------------------------------- with LibreOffice

# Always recalculate OOXML formulas on load, whatever this LibreOffice's default is.
_RECALC_ALWAYS = """<?xml version="1.0" encoding="UTF-8"?>
<oor:items xmlns:oor="http://openoffice.org/2001/registry"
  xmlns:xs="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<item oor:path="/org.openoffice.Office.Calc/Formula/Load">
<prop oor:name="OOXMLRecalcMode" oor:op="fuse"><value>0</value></prop></item>
</oor:items>
"""


def _libreoffice() -> str:
    exe = shutil.which("libreoffice")
    require_tool(exe is not None, "LibreOffice (`libreoffice`, apt-get install "
                                  "libreoffice-calc-nogui)")
    return exe


def recalculate(files: list[Path], outdir: Path, profile: Path) -> list[Path]:
    """Open and re-save every file in one headless LibreOffice start (that is the slow part)."""
    exe = _libreoffice()
    (profile / "user").mkdir(parents=True, exist_ok=True)
    (profile / "user" / "registrymodifications.xcu").write_text(_RECALC_ALWAYS)
    cmd = [exe, f"-env:UserInstallation={profile.as_uri()}", "--headless", "--norestore",
           "--convert-to", "xlsx", "--outdir", str(outdir), *map(str, files)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    outs = [outdir / f.name for f in files]
    missing = [o.name for o in outs if not o.exists()]
    assert not missing, f"LibreOffice did not convert {missing}: {done.stdout}{done.stderr}"
    return outs


@dataclass
class Case:
    config: SheetConfig  # the shape (and what the Check sheet was computed from)
    x: torch.Tensor  # the inputs, gamma, beta, eps the recalculated file should reflect
    gamma: tuple[float, ...]
    beta: tuple[float, ...]
    eps: float
    edited: bool
    wb: object = None


@pytest.fixture(scope="module")
def recalculated(tmp_path_factory) -> dict[str, Case]:
    _libreoffice()
    root = tmp_path_factory.mktemp("workbooks")
    src = root / "src"
    cases, files = {}, []

    default = SheetConfig()
    files.append(write_workbook(src / "default.xlsx"))
    cases["default"] = Case(default, input_tensor(default), default.gamma, default.beta,
                            default.eps, edited=False)

    gn3 = SheetConfig(2, 6, 3, 2, 3, eps=0.1, seed=7,
                      gamma=(2.0, -1.0, 0.5, 1.5, 3.0, -2.0), beta=(1.0, 0.0, -1.0, 0.5, 0.25, 2.0))
    files.append(write_workbook(src / "gn3.xlsx", 2, 6, 3, 2, 3, eps=0.1, seed=7,
                                gamma=gn3.gamma, beta=gn3.beta))
    cases["gn3"] = Case(gn3, input_tensor(gn3), gn3.gamma, gn3.beta, gn3.eps, edited=False)

    # Edited by hand after generation: only live formulas can follow these changes.
    edited = write_workbook(src / "edited.xlsx")
    layout = workbook_layout(default)
    x = input_tensor(default)
    x[1, 2, 0, 1], x[0, 0, 1, 1] = 3.5, -7.0
    gamma, beta, eps = (2.0, -1.0, 0.5, 3.0), (1.0, -2.0, 0.25, 0.0), 0.25
    wb = load_workbook(edited)
    ws = wb["Inputs"]
    ws[layout.x.cell(1, 2, 0, 1)] = 3.5
    ws[layout.x.cell(0, 0, 1, 1)] = -7.0
    ws[layout.eps] = eps
    for c in range(default.channels):
        ws[layout.gamma[c]], ws[layout.beta[c]] = gamma[c], beta[c]
    wb.save(edited)
    files.append(edited)
    cases["edited"] = Case(default, x, gamma, beta, eps, edited=True)

    outs = recalculate(files, root / "out", root / "profile")
    for case, out in zip(cases.values(), outs, strict=True):
        case.wb = load_workbook(out, data_only=True)
    return cases


@pytest.mark.spreadsheet
@pytest.mark.parametrize("name", ["default", "gn3", "edited"])
def test_recalculated_outputs_and_statistics_match_pytorch(recalculated, name):
    case = recalculated[name]
    layout = workbook_layout(case.config)
    want = expected_outputs(case.x, case.gamma, case.beta, case.eps, case.config.groups)
    for key in workbook_norms():
        norm = layout.norms[key]
        ws = case.wb[norm.sheet]
        torch.testing.assert_close(read_grid(ws, norm.x), case.x, rtol=0, atol=0)
        torch.testing.assert_close(read_grid(ws, norm.y), want[key], rtol=0, atol=TOL,
                                   msg=lambda m, k=key: f"{name} {k}: {m}")
        mean, var = expected_stats(case.x, key, case.config.groups)
        got_mean = torch.tensor([ws[norm.mean_cell(k)].value for k in range(len(norm.groups))],
                                dtype=torch.float64)
        got_var = torch.tensor([ws[norm.var_cell(k)].value for k in range(len(norm.groups))],
                               dtype=torch.float64)
        torch.testing.assert_close(got_mean, mean, rtol=0, atol=TOL)
        torch.testing.assert_close(got_var, var, rtol=0, atol=TOL)


@pytest.mark.spreadsheet
@pytest.mark.parametrize("name", ["default", "gn3"])
def test_check_sheet_finds_no_difference(recalculated, name):
    case = recalculated[name]
    layout = workbook_layout(case.config)
    check = case.wb["Check"]
    for key in workbook_norms():
        diffs = read_grid(check, layout.check_diffs[key])
        assert diffs.abs().max() < TOL, key
        worst = check[layout.max_diff[key]].value
        assert isinstance(worst, (int, float)) and 0 <= worst < TOL, (key, worst)


@pytest.mark.spreadsheet
def test_check_sheet_goes_stale_after_edits(recalculated):
    """PyTorch's pasted numbers do not follow edits, so the live sheets now differ from them."""
    case = recalculated["edited"]
    layout = workbook_layout(case.config)
    check = case.wb["Check"]
    for key in workbook_norms():
        assert check[layout.max_diff[key]].value > 0.1, key
