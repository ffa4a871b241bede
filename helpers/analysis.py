"""Error analysis: predictions with per-image loss, confusion matrix, per-class accuracy,
the most confused pairs (seed 001's table) and the misclassified images sorted by loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.nn.functional as F
from torch import nn

from .augment import test_transforms
from .data import make_loader
from .engine import predict_logits


@dataclass
class Predictions:
    """What a model says about a set of images, aligned with the images' order."""

    logits: np.ndarray    # (N, 10) float32
    labels: np.ndarray    # (N,) true classes
    probs: np.ndarray     # (N, 10) softmax
    preds: np.ndarray     # (N,) argmax class
    losses: np.ndarray    # (N,) cross-entropy of each image

    @property
    def correct(self) -> np.ndarray:
        return self.preds == self.labels

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())


def predict(model: nn.Module, images: np.ndarray, labels: np.ndarray, mean, std, device="cpu",
            batch_size: int = 512, tta_flip: bool = False, progress: bool = False) -> Predictions:
    """Run `model` over uint8 images (normalised with mean/std) and collect everything per image."""
    loader = make_loader(images, labels, test_transforms(mean, std), batch_size=batch_size)
    logits, y = predict_logits(model.to(device), loader, device, tta_flip=tta_flip, progress=progress)
    losses = F.cross_entropy(logits, y, reduction="none")
    probs = logits.softmax(1)
    return Predictions(logits.numpy(), y.numpy(), probs.numpy(), logits.argmax(1).numpy(), losses.numpy())


def confusion_matrix(labels, preds, num_classes: int = 10) -> np.ndarray:
    """cm[t, p] = number of images of true class t predicted as p."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    return np.bincount(labels * num_classes + preds, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall of each true class: the diagonal over the row sums (nan for an empty class)."""
    rows = cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, np.diag(cm) / rows, np.nan)


def top_confused_pairs(cm: np.ndarray, classes, k: int = 5) -> list[tuple[str, str, int]]:
    """The k most frequent (target, prediction, count) mistakes, most frequent first."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:k]
    pairs = [(classes[i // len(classes)], classes[i % len(classes)], int(off.flat[i])) for i in order]
    return [p for p in pairs if p[2] > 0]


def misclassified_by_loss(pred: Predictions, k: int | None = None) -> np.ndarray:
    """Indices of the wrong predictions, highest loss (most confidently wrong) first."""
    wrong = np.flatnonzero(~pred.correct)
    order = wrong[np.argsort(-pred.losses[wrong], kind="stable")]
    return order if k is None else order[:k]


def format_table(rows, headers) -> str:
    """A plain-text table with aligned columns, for notebooks and the terminal."""
    cells = [list(map(str, headers))] + [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r]
                                         for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def class_report(cm: np.ndarray, classes) -> str:
    """Per-class accuracy and counts as a table."""
    acc = per_class_accuracy(cm)
    rows = [(c, int(cm[i].sum()), int(cm[i, i]), float(acc[i])) for i, c in enumerate(classes)]
    return format_table(rows, ("class", "images", "correct", "accuracy"))


__all__ = ["Predictions", "predict", "confusion_matrix", "per_class_accuracy", "top_confused_pairs",
           "misclassified_by_loss", "format_table", "class_report"]
