"""The norms as data: which positions each norm averages together, and how the sheets say so.

A norm is nothing but a partition of the N*C*H*W cells into groups that share one mean and
one variance. Its :class:`~normlab.models.norms.NormSpec`'s ``formula`` names the axes one
mean and variance are taken over (``"N,H,W"``: per channel over the batch; ``"C/G,H,W"``:
per image and group of channels), and ``reduction_groups`` turns that into the partition.
The workbook shows every registered norm with a formula (:func:`workbook_norms`; each
also has its text in ``NORM_TEXT`` and PyTorch's call in the Check sheet) and says which
it leaves out (:func:`left_out`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from normlab.models.norms import norm_spec, norm_specs
from normlab.workbook.config import Index, SheetConfig

# Why a norm without a formula is not in the workbook (the Inputs sheet and the CLI say it).
LEFT_OUT_WHY = ("their output is not (x − mean) / √(variance + ε) · γ + β over one partition "
                "of x (running-statistics corrections, virtual batches, no mean subtracted, "
                "or learned terms), so they have no formula here")


def workbook_norms() -> tuple[str, ...]:
    """The norms the workbook shows: every registered norm with a formula, in teaching
    order (BN, LN, GN, IN)."""
    return tuple(spec.name for spec in norm_specs() if spec.formula)


def left_out() -> tuple[str, ...]:
    """The registered norms the workbook leaves out (no formula; ``none`` normalizes
    nothing and is not counted)."""
    return tuple(spec.name for spec in norm_specs() if not spec.formula and spec.name != "none")


def left_out_note() -> str:
    names = left_out()
    return (f"Not in this workbook: {', '.join(names)} ({LEFT_OUT_WHY})." if names else "")


@dataclass(frozen=True)
class Group:
    """One set of (n, c, h, w) positions that share a mean and a variance."""

    label: str
    members: tuple[Index, ...]


def _span(lo: int, hi: int) -> str:
    return f"{lo}–{hi}" if hi > lo else f"{lo}"


FORMULA_AXES = ("N", "C", "C/G", "H", "W")


def _group_key(formula: str, config: SheetConfig) -> Callable[[int, int], tuple[object, str]]:
    """(n, c) -> (group key, label) for a formula's axes. Statistics never depend on (h, w):
    every formula averages over H and W."""
    axes = tuple(a.strip() for a in formula.split(","))
    if not set(axes) <= set(FORMULA_AXES) or not {"H", "W"} <= set(axes):
        raise ValueError(f"formula {formula!r}: axes must be among {', '.join(FORMULA_AXES)} "
                         "and include H and W")
    n_img, chans = config.batch, config.channels
    per = chans // config.groups

    def key(n: int, c: int) -> tuple[object, str]:
        parts, words = [], []
        if "N" not in axes:
            parts.append(n)
            words.append(f"image {n}")
        if "C/G" in axes:
            g = c // per
            parts.append(g)
            words.append(f"group {g} (channels {_span(g * per, g * per + per - 1)})")
        elif "C" not in axes:
            parts.append(c)
            words.append(f"channel {c}")
        label = " · ".join(words)
        if "N" in axes:
            label += f" (images {_span(0, n_img - 1)})"
        if "C" in axes:
            label += f" (channels {_span(0, chans - 1)})"
        return tuple(parts), label

    return key


def reduction_groups(norm: str, config: SheetConfig) -> list[Group]:
    """The groups of positions whose values ``norm`` averages together, in reading order.

    BN: per channel over the batch; LN: per image over all channels; GN: per image per group
    of channels; IN: per image per channel. Each group spans all (h, w) of its (n, c) pairs.
    """
    formula = norm_spec(norm).formula if norm in workbook_norms() else None
    if formula is None:
        raise ValueError(f"norm {norm!r} has no workbook formula; the workbook's norms are "
                         f"{', '.join(workbook_norms())}")
    key_of = _group_key(formula, config)
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
