"""The normalization workbook: BatchNorm, LayerNorm, GroupNorm and InstanceNorm as live
spreadsheet formulas over one small seeded tensor, checked against PyTorch."""

from normlab.workbook.build import (
    Grid,
    Group,
    Layout,
    NormLayout,
    SheetConfig,
    build_workbook,
    input_tensor,
    reduction_groups,
    torch_outputs,
    workbook_layout,
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
    "reduction_groups",
    "torch_outputs",
    "workbook_layout",
    "write_workbook",
]
