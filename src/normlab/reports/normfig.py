"""Which values each norm averages over, found by probing the code's own layers.

Wu & He's Group Normalization paper (2018, Fig. 2) draws BN, LN, IN and GN as an (N, C, H×W)
block with one shaded set: the values that share one mean and variance. Here the set is not
drawn from a description but measured: build ``make_norm(name, C, groups)`` in train mode,
perturb one input element, and record which outputs change. A normalised output depends on
the other inputs only through its group's mean and variance, so the changed outputs are
exactly the perturbed element's normalisation group. The figure draws the norms with a
workbook formula (one mean and variance per set) and names the registered norms it leaves out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from normlab.models import make_norm, norm_spec
from normlab.reports.figures import save

PROBE_SHAPE = (5, 6, 2, 3)  # N, C, H, W: H x W flattens to a 6-deep axis, C = 6 splits in 2 groups
PROBE_GROUPS = 2
PROBED = ("bn", "ln", "in", "gn")  # the paper's order (the norms with a workbook formula)


def probe_norm(name: str, shape: tuple[int, int, int, int] = PROBE_SHAPE,
               groups: int = PROBE_GROUPS, index: tuple[int, int, int, int] | None = None,
               ) -> torch.Tensor:
    """Boolean mask of shape ``shape``: the outputs that change when input ``index`` moves.

    The default index is the last sample's first channel: in the drawing, that sample is the
    visible side face and that channel the front face.
    """
    index = (shape[0] - 1, 0, 0, 0) if index is None else index
    layer = make_norm(name, shape[1], groups).double().train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    bumped = x.clone()
    bumped[index] += 1.0
    with torch.no_grad():
        return (layer(bumped) - layer(x)).abs() > 1e-12


def _draw_block(ax, mask: np.ndarray, colour) -> None:
    """Draw an (N, C, HW) boolean block as voxels, the set shaded."""
    n, c, hw = mask.shape
    faces = np.empty((*mask.shape, 4))
    faces[mask] = colour
    faces[~mask] = (0.93, 0.93, 0.93, 1.0)
    ax.voxels(np.ones(mask.shape, dtype=bool), facecolors=faces, edgecolor=(0.2, 0.2, 0.2, 0.6),
              linewidth=0.5, shade=False)
    ax.set_box_aspect((n, c, hw))
    ax.set_xlabel("N", labelpad=-14, fontsize=11)
    ax.set_ylabel("C", labelpad=-14, fontsize=11)
    ax.set_zlabel("H, W", labelpad=-14, fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_zticks([])
    ax.view_init(elev=22, azim=-58)
    ax.xaxis.pane.set_visible(False)
    ax.yaxis.pane.set_visible(False)
    ax.zaxis.pane.set_visible(False)


def norm_groups_figure(path: Path) -> Path:
    n, c, h, w = PROBE_SHAPE
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    fig.suptitle(
        "Shaded: the values that share one mean and variance with one input element,\n"
        f"measured on make_norm(name, C) in train mode for an (N, C, H, W) = {PROBE_SHAPE} "
        f"input (GN: {PROBE_GROUPS} groups)", fontsize=11)
    colour = (0.27, 0.51, 0.71, 1.0)
    for i, name in enumerate(PROBED):
        mask = probe_norm(name).reshape(n, c, h * w).numpy()
        ax = fig.add_subplot(1, len(PROBED), i + 1, projection="3d")
        _draw_block(ax, mask, colour)
        ax.set_title(f"{norm_spec(name).title} ({name})\n{int(mask.sum())} values per set",
                     fontsize=10.5, y=0.98)
    from normlab.workbook.partition import left_out

    others = [n for n in left_out() if n not in PROBED]
    if others:
        fig.supxlabel(f"Not drawn: {', '.join(others)} (no workbook formula: their output "
                      "is not (x − mean) / √(variance + ε) over one set of values)", fontsize=9)
    return save(fig, path)
