"""The figure methods shared by a suite's results and one run (:class:`_Figures`, the mixin
of :class:`~normlab.notebook.results.Results` and :class:`~normlab.notebook.results.Run`):
curves, accuracy, loss, gallery and confusion, each a new matplotlib Figure drawn by the
``plot_*`` functions of :mod:`normlab.reports.figures` (no pyplot, nothing saved).
"""

from __future__ import annotations

from matplotlib.figure import Figure

from normlab.notebook.display import _figures_display_inline
from normlab.reports.build import ImageLoader, load_test_images
from normlab.reports.collect import RunResults, VariantResults
from normlab.reports.figures import LABELS, curve_sets, first_predictions, palette, plot_curves


class _Figures:
    """The figure methods shared by a suite's results and one run: each returns a new
    matplotlib Figure drawn by the report's code (no pyplot, nothing saved)."""

    def __init__(self, images: ImageLoader | None = None) -> None:
        self._image_loader = images or load_test_images
        self._images: tuple | None = None

    # subclasses give the variants (read from disk now) and the dataset
    def _variant_list(self) -> list[VariantResults]:
        raise NotImplementedError

    def _dataset(self) -> str:
        raise NotImplementedError

    def curves(self, metric: str = "test_acc", *, without_l1: bool = False) -> Figure:
        """``metric`` per epoch (test_acc, test_loss, train_acc or train_loss), mean over seeds
        with a min-max band: the report's curve figure. ``without_l1`` leaves out the
        variants that have an L1 term (the seed's "3 models" graphs)."""
        if metric not in LABELS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(LABELS)}")
        _figures_display_inline()
        variants = self._variant_list()
        sets = {key: (words, chosen) for key, words, chosen in curve_sets(variants)}
        words, chosen = sets["all"]
        if without_l1:
            if "no_l1" in sets:
                words, chosen = sets["no_l1"]
            elif any(v.l1 > 0 for v in chosen):
                raise ValueError("every variant with metrics has an L1 term: nothing to plot "
                                 "without L1")
        if not chosen:
            raise ValueError(f"{self._where()}: no run has finished an epoch yet, so there is "
                             "nothing to plot")
        return plot_curves(chosen, metric, palette(variants), self._subtitle(words))

    def _subtitle(self, words: str) -> str:
        return words

    def accuracy(self, *, without_l1: bool = False) -> Figure:
        """Test accuracy per epoch (all models, or ``without_l1``)."""
        return self.curves("test_acc", without_l1=without_l1)

    def loss(self, *, without_l1: bool = False) -> Figure:
        """Test loss per epoch, log scale (all models, or ``without_l1``)."""
        return self.curves("test_loss", without_l1=without_l1)

    def gallery(self, variant: str | VariantResults | None = None) -> Figure:
        """The ten most confident mistakes of ``variant``'s first finished run: the report's
        gallery. ``variant`` is a name or label (optional when there is one variant)."""
        from normlab.reports.figures import variant_mistakes

        v, run, preds = self._predictions(variant)
        images, classes = self._test_images()
        if len(images) != len(preds["target"]):
            raise ValueError(f"{run.dir}: {len(preds['target'])} predictions but the "
                             f"{self._dataset()} test set has {len(images)} images")
        return variant_mistakes(v, run, preds, images, classes)

    def confusion(self, variant: str | VariantResults | None = None) -> Figure:
        """The confusion matrix of ``variant``'s first finished run: the report's figure."""
        from normlab.reports.figures import variant_confusion

        v, run, preds = self._predictions(variant)
        return variant_confusion(v, run, preds, self._classes())

    def variant(self, name: str | VariantResults | None = None) -> VariantResults:
        """A variant by name or label (the only one when ``name`` is None)."""
        variants = self._variant_list()
        if isinstance(name, VariantResults):
            name = name.name
        if name is None:
            if len(variants) == 1:
                return variants[0]
            raise ValueError("name a variant: " + ", ".join(v.name for v in variants))
        for v in variants:
            if name in (v.name, v.label):
                return v
        raise ValueError(f"no variant {name!r}; the variants are "
                         + ", ".join(v.name for v in variants))

    def _predictions(self, name) -> tuple[VariantResults, RunResults, dict]:
        _figures_display_inline()
        v = self.variant(name)
        run, preds = first_predictions(v)
        if preds is None:
            raise ValueError(f"{v.name} has no finished run yet (a gallery and a confusion "
                             "matrix need the predictions of a finished run)")
        return v, run, preds

    def _test_images(self) -> tuple:
        if self._images is None:
            import numpy as np

            images, classes = self._image_loader(self._dataset())
            self._images = (np.asarray(images), tuple(classes))
        return self._images

    def _classes(self) -> tuple[str, ...]:
        """The class names, without loading the images when the dataset is a known one."""
        from normlab.data.dataset import CLASSES

        if self._images is None and self._dataset() in CLASSES:
            return CLASSES[self._dataset()]
        return self._test_images()[1]

    def _where(self) -> str:
        raise NotImplementedError
