"""What the notebook API shows and needs to show it: :class:`Doc` (report blocks that display as
HTML and print as Markdown), the registration that lets Jupyter show a returned matplotlib
``Figure`` inline as the report's PNG, and the pandas import with its install hint (pandas is
the optional ``notebook`` extra).
"""

from __future__ import annotations

import sys

from matplotlib.figure import Figure

from normlab.reports.doc import Block, to_html, to_markdown

PANDAS_HINT = "pip install 'normlab[notebook]' (or just pandas)"


def _pandas():
    """pandas, imported when a DataFrame is asked for (it is the optional ``notebook`` extra)."""
    try:
        import pandas
    except ImportError as err:
        raise ImportError(f"DataFrames need pandas, which is not installed: {PANDAS_HINT}") \
            from err
    return pandas


def _ipython():
    """The running IPython shell, or None (a plain script)."""
    module = sys.modules.get("IPython")
    return module.get_ipython() if module is not None else None


def _figures_display_inline() -> None:
    """Let Jupyter show a returned ``Figure`` as the report's PNG. Figures here never touch
    pyplot, so the inline backend may not be loaded; if nothing (the inline backend, the
    user) has registered a PNG formatter for Figure yet, register the report's."""
    shell = _ipython()
    if shell is None or not hasattr(shell, "display_formatter"):
        return
    formatter = shell.display_formatter.formatters.get("image/png")
    if formatter is None:
        return
    try:
        formatter.lookup_by_type(Figure)
    except KeyError:
        from normlab.reports.figures import png_bytes

        formatter.for_type(Figure, png_bytes)


class Doc:
    """Report blocks (headings, paragraphs, bullets, tables) that display as HTML in a
    notebook and print as Markdown."""

    def __init__(self, blocks: list[Block]) -> None:
        self.blocks = blocks

    def _repr_html_(self) -> str:
        return to_html(self.blocks, top_level=3)

    def _repr_markdown_(self) -> str:
        return to_markdown(self.blocks)

    def __str__(self) -> str:
        return to_markdown(self.blocks)

    __repr__ = __str__
