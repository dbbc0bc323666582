"""The normalization workbook: BatchNorm, LayerNorm, GroupNorm and InstanceNorm (the norms
with a formula in the registry) as live spreadsheet formulas over one small seeded tensor,
checked against PyTorch; it names the norms it leaves out."""

from normlab.workbook.build import (
    Grid,
    Group,
    Layout,
    NormLayout,
    SheetConfig,
    build_workbook,
    input_tensor,
    left_out,
    reduction_groups,
    torch_outputs,
    workbook_layout,
    workbook_norms,
    write_workbook,
)

__all__ = [
    "Grid",
    "Group",
    "Layout",
    "NormLayout",
    "SheetConfig",
    "build_workbook",
    "input_tensor",
    "left_out",
    "reduction_groups",
    "torch_outputs",
    "workbook_layout",
    "workbook_norms",
    "write_workbook",
]
