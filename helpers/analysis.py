"""Error analysis, on a model's predictions: per-image probabilities and loss, confusion
matrix, per-class accuracy, the most confused pairs (S10's table), the misclassified
images sorted by loss, Grad-CAM, and the tables the notebooks and the CLI print. The model
runs through helpers.loop's `predict_logits`, as evaluation in training does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .loaders import make_loader
from .loop import predict_logits


# ----------------------------------------------------------------------------------------
# Predictions and the error analysis
# ----------------------------------------------------------------------------------------
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


def predict(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, stats: tuple, batch_size: int = 512,
            tta: dict | None = None, progress: bool = False) -> Predictions:
    """Run `model`, on its own device, over uint8 images normalised with stats = (mean, std), and
    collect everything per image. `tta`: predict_logits' tta_flip, tta_shift and tta_centre
    (default: none; a checkpoint's: `checkpoint.inference_settings`)."""
    from .augment import test_transforms           # albumentations: imported only when used

    loader = make_loader(images, labels, test_transforms(*stats), batch_size=batch_size)
    logits, y = predict_logits(model, loader, **(tta or {}), progress=progress)
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


# ----------------------------------------------------------------------------------------
# Grad-CAM: where the model looked
# ----------------------------------------------------------------------------------------
def cam_layer(model: nn.Module) -> nn.Module:
    """The last convolutional block of a course model: Grad-CAM's usual target layer."""
    from .checkpoint import unwrap
    from .models import CompactCNN, FastNet, ResNet9, VGGNet

    model = unwrap(model)
    if isinstance(model, ResNet9):
        return model.layer3            # 512 x 4 x 4, after the second residual block
    if isinstance(model, VGGNet):
        return model.conv[-2]          # the last ReLU before the final max-pool: 256 x 8 x 8
    if isinstance(model, CompactCNN):
        return model.features[-3]      # the last ELU before the final max-pool: 128 x 8 x 8
    if isinstance(model, FastNet):
        return model.groups[-1]        # the last conv group: 256 x 3 x 3
    raise TypeError(f"no Grad-CAM layer known for {type(model).__name__}")


def grad_cam(model: nn.Module, images: np.ndarray, classes, *, stats: tuple,
             layer: nn.Module | None = None) -> np.ndarray:
    """Grad-CAM heatmaps (N, 32, 32) in 0..1: for each uint8 image, normalised with stats =
    (mean, std), the evidence in `layer` (default: cam_layer(model)) for the class given in
    `classes`, per pixel (pytorch_grad_cam), on the model's device."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from .augment import test_transforms

    x = torch.stack([torch.as_tensor(test_transforms(*stats)(image=np.ascontiguousarray(im))["image"])
                     for im in images]).to(next(model.parameters()).device)
    model = model.eval()
    with GradCAM(model=model, target_layers=[layer or cam_layer(model)]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])


def format_table(rows, headers) -> str:
    """A plain-text table with aligned columns, for notebooks and the terminal."""
    cells = [list(map(str, headers))] + [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r]
                                         for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def history_table(history: dict) -> str:
    """One line per epoch of a training history: losses, accuracies, the epoch's last LR."""
    steps = len(history["lr"]) // max(len(history["train_loss"]), 1)
    read = lambda v, f: "-" if v is None else format(v, f)          # None: that epoch was not evaluated
    rows = [(f"{e + 1}/{len(history['train_loss'])}", f"{history['train_loss'][e]:.4f}",
             f"{history['train_acc'][e]:.2%}", read(history["eval_loss"][e], ".4f"), read(history["eval_acc"][e], ".2%"),
             f"{history['lr'][(e + 1) * steps - 1]:.2e}") for e in range(len(history["train_loss"]))]
    name = history.get("eval_set", "test")
    return format_table(rows, ("epoch", "train loss", "train acc", f"{name} loss", f"{name} acc", "last LR"))


def class_report(cm: np.ndarray, classes) -> str:
    """Per-class accuracy and counts as a table."""
    acc = per_class_accuracy(cm)
    rows = [(c, int(cm[i].sum()), int(cm[i, i]), float(acc[i])) for i, c in enumerate(classes)]
    return format_table(rows, ("class", "images", "correct", "accuracy"))


__all__ = ["Predictions", "predict", "confusion_matrix", "per_class_accuracy", "top_confused_pairs",
           "misclassified_by_loss", "cam_layer", "grad_cam", "format_table", "history_table", "class_report"]
