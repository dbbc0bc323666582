"""The norms as data: which positions each norm averages together, and how the sheets say so.

A norm is nothing but a partition of the N*C*H*W cells into groups that share one mean and
one variance. ``reduction_groups`` is the only place that knows each norm's partition, so
adding a norm means adding one key function here (and its text in ``NORM_TEXT``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from normlab.workbook.config import Index, SheetConfig


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
