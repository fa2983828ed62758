"""Accuracy figures of a class map against a reference: confusion matrix, IoU, F1, OA, kappa (numpy only).

Conventions: the confusion matrix ``cm[i, j]`` counts pixels whose *reference* class is ``i``
and whose *predicted* class is ``j`` (rows are the truth, as in scikit-learn). A figure whose
denominator is zero (a class that neither raster contains, precision of a class never
predicted) is NaN, and means skip NaN, so absent classes neither help nor hurt.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


def confusion_matrix(
    reference: npt.NDArray[np.integer],
    predicted: npt.NDArray[np.integer],
    num_classes: int,
    valid: npt.NDArray[np.bool_] | None = None,
) -> npt.NDArray[np.int64]:
    """Count (reference, predicted) pairs of class indexes.

    Args:
        reference: Class indexes ``0 .. num_classes - 1``, any shape.
        predicted: Class indexes, the same shape.
        num_classes: K.
        valid: Pixels to count (the same shape); ``None`` counts all.

    Returns:
        ``(K, K)`` int64, rows = reference, columns = prediction.

    Raises:
        ValueError: Shapes differ, or an index is outside ``0 .. K - 1`` where counted.
    """
    reference = np.asarray(reference)
    predicted = np.asarray(predicted)
    if reference.shape != predicted.shape:
        raise ValueError(f"reference {reference.shape} and prediction {predicted.shape} differ in shape")
    if valid is not None:
        reference = reference[valid]
        predicted = predicted[valid]
    reference = reference.ravel().astype(np.int64, copy=False)
    predicted = predicted.ravel().astype(np.int64, copy=False)
    for name, values in (("reference", reference), ("prediction", predicted)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} holds class indexes outside 0..{num_classes - 1}")
    counts = np.bincount(reference * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _ratio(num: npt.NDArray[np.float64], den: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _nanmean(values: npt.NDArray[np.float64]) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


@dataclass(frozen=True)
class Metrics:
    """Figures derived from one confusion matrix.

    Attributes:
        confusion: ``(K, K)`` counts, rows = reference class, columns = predicted class.
        class_ids: Raster value of each class, in matrix order.
        class_names: Name of each class, in matrix order.
        region: The part of the grid counted, as scored (rows clipped to the grid), when known.
    """

    confusion: npt.NDArray[np.int64]
    class_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    region: str | None = None

    def __post_init__(self) -> None:
        cm = np.asarray(self.confusion, dtype=np.int64)
        k = len(self.class_ids)
        if cm.shape != (k, k) or len(self.class_names) != k:
            raise ValueError(
                f"confusion {cm.shape} does not fit {k} class ids and {len(self.class_names)} names"
            )
        object.__setattr__(self, "confusion", cm)

    @property
    def pixels(self) -> int:
        """Pixels counted."""
        return int(self.confusion.sum())

    @property
    def support(self) -> npt.NDArray[np.int64]:
        """Reference pixels per class."""
        return self.confusion.sum(axis=1)

    @property
    def predicted_pixels(self) -> npt.NDArray[np.int64]:
        """Predicted pixels per class."""
        return self.confusion.sum(axis=0)

    @property
    def true_positives(self) -> npt.NDArray[np.int64]:
        """Correct pixels per class (the diagonal)."""
        return np.diag(self.confusion)

    @property
    def iou(self) -> npt.NDArray[np.float64]:
        """Intersection over union per class, ``TP / (TP + FP + FN)``; NaN where no raster has the class."""
        tp = self.true_positives.astype(np.float64)
        return _ratio(tp, self.support + self.predicted_pixels - tp)

    @property
    def precision(self) -> npt.NDArray[np.float64]:
        """``TP / predicted`` per class (user's accuracy); NaN for a class never predicted."""
        return _ratio(self.true_positives.astype(np.float64), self.predicted_pixels.astype(np.float64))

    @property
    def recall(self) -> npt.NDArray[np.float64]:
        """``TP / reference`` per class (producer's accuracy); NaN for a class absent from the reference."""
        return _ratio(self.true_positives.astype(np.float64), self.support.astype(np.float64))

    @property
    def f1(self) -> npt.NDArray[np.float64]:
        """``2 TP / (reference + predicted)`` per class; NaN where neither raster has the class."""
        tp = self.true_positives.astype(np.float64)
        return _ratio(2 * tp, (self.support + self.predicted_pixels).astype(np.float64))

    @property
    def miou(self) -> float:
        """Mean IoU over the classes present in the reference or the prediction."""
        return _nanmean(self.iou)

    @property
    def mean_f1(self) -> float:
        """Mean F1 over the classes present in the reference or the prediction."""
        return _nanmean(self.f1)

    @property
    def overall_accuracy(self) -> float:
        """Correct pixels / all pixels (NaN when no pixel was counted)."""
        total = self.pixels
        return float(self.true_positives.sum() / total) if total else math.nan

    @property
    def kappa(self) -> float:
        """Cohen's kappa: ``(p_o - p_e) / (1 - p_e)``, chance agreement from the marginals (Cohen 1960).

        1 when both maps agree perfectly; NaN when no pixel was counted or chance agreement is 1
        (both maps hold one and the same class everywhere).
        """
        total = self.pixels
        if not total:
            return math.nan
        p_o = self.true_positives.sum() / total
        p_e = float((self.support.astype(np.float64) * self.predicted_pixels).sum()) / float(total) ** 2
        return float((p_o - p_e) / (1 - p_e)) if p_e < 1 else math.nan

    def __add__(self, other: Metrics) -> Metrics:
        if self.class_ids != other.class_ids:
            raise ValueError("cannot add metrics over different classes")
        return Metrics(self.confusion + other.confusion, self.class_ids, self.class_names)

    def to_dict(self) -> dict[str, object]:
        """All figures as plain Python values (NaN becomes ``None``), ready for JSON."""

        def clean(value: float) -> float | None:
            return None if math.isnan(value) else round(float(value), 6)

        per_class = [
            {
                "id": cid,
                "name": name,
                "reference_pixels": int(self.support[k]),
                "predicted_pixels": int(self.predicted_pixels[k]),
                "iou": clean(self.iou[k]),
                "precision": clean(self.precision[k]),
                "recall": clean(self.recall[k]),
                "f1": clean(self.f1[k]),
            }
            for k, (cid, name) in enumerate(zip(self.class_ids, self.class_names, strict=True))
        ]
        return {
            "pixels": self.pixels,
            "overall_accuracy": clean(self.overall_accuracy),
            "miou": clean(self.miou),
            "mean_f1": clean(self.mean_f1),
            "kappa": clean(self.kappa),
            "classes": per_class,
            "confusion_matrix": {
                "rows": "reference",
                "columns": "prediction",
                "class_ids": list(self.class_ids),
                "counts": self.confusion.tolist(),
            },
        }

    def to_json(self, **extra: object) -> str:
        """The figures of :meth:`to_dict` (plus ``extra`` keys) as indented JSON."""
        return json.dumps({**extra, **self.to_dict()}, indent=2)

    def format_table(self) -> str:
        """A plain-text report: per-class table, summary figures and the confusion matrix."""
        width = max(8, *(len(n) for n in self.class_names))

        def fmt(value: float) -> str:
            return "    -" if math.isnan(value) else f"{value:5.3f}"

        lines = [
            f"{'id':>5}  {'class':<{width}}  {'IoU':>5}  {'prec':>5}  {'recall':>6}  {'F1':>5}  "
            f"{'ref px':>10}  {'pred px':>10}"
        ]
        for k, (cid, name) in enumerate(zip(self.class_ids, self.class_names, strict=True)):
            lines.append(
                f"{cid:>5}  {name:<{width}}  {fmt(self.iou[k])}  {fmt(self.precision[k])}  "
                f"{fmt(self.recall[k]):>6}  "
                f"{fmt(self.f1[k])}  {int(self.support[k]):>10}  {int(self.predicted_pixels[k]):>10}"
            )
        lines += [
            "",
            f"pixels:           {self.pixels}",
            f"overall accuracy: {fmt(self.overall_accuracy)}",
            f"mean IoU:         {fmt(self.miou)}",
            f"mean F1:          {fmt(self.mean_f1)}",
            f"Cohen's kappa:    {fmt(self.kappa)}",
            "",
            "confusion matrix (rows: reference, columns: prediction):",
        ]
        cell = max(7, len(str(int(self.confusion.max(initial=0)))) + 1)
        lines.append(" " * (width + 7) + "".join(f"{cid:>{cell}}" for cid in self.class_ids))
        for k, (cid, name) in enumerate(zip(self.class_ids, self.class_names, strict=True)):
            lines.append(
                f"{cid:>5}  {name:<{width}}" + "".join(f"{int(v):>{cell}}" for v in self.confusion[k])
            )
        return "\n".join(lines)


def metrics_from_confusion(
    confusion: npt.NDArray[np.integer], class_ids: Sequence[int], class_names: Sequence[str] | None = None
) -> Metrics:
    """Wrap a confusion matrix; names default to the ids as text."""
    names = tuple(class_names) if class_names is not None else tuple(str(c) for c in class_ids)
    return Metrics(np.asarray(confusion, dtype=np.int64), tuple(int(c) for c in class_ids), names)
