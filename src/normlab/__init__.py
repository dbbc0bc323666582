"""normlab: normalization and regularization experiments on small CNNs.

The notebook API lives at the top of the package (imported on first use, so that
``import normlab`` and the command line stay light):

    import normlab
    results = normlab.run_suite("s6-quick", out="runs/s6q")   # -> normlab.Results
    results = normlab.load_results("runs/s6")                 # a suite trained earlier
    run = normlab.train(norm="ln", epochs=3, subset=2000)     # one run -> normlab.Run

See :mod:`normlab.notebook`.
"""

__version__ = "0.15.0"

_NOTEBOOK = ("NotebookProgress", "Results", "Run", "load_results", "run_suite", "train")
__all__ = ["__version__", *_NOTEBOOK]


def __getattr__(name: str):
    if name in _NOTEBOOK:
        from normlab import notebook

        return getattr(notebook, name)
    raise AttributeError(f"module 'normlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_NOTEBOOK})
