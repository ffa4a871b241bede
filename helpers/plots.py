"""Plots: every figure the notebooks and the command line draw, in matplotlib.

Each function returns the Figure; `save_figure(fig, path)` writes it atomically.
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

if not os.environ.get("DISPLAY") and not os.environ.get("MPLBACKEND") and "ipykernel" not in os.sys.modules:
    matplotlib.use("Agg")  # headless terminals and CI; notebooks keep their inline backend

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from .files import atomic_write  # noqa: E402


def format_probability(p: float) -> str:
    """A probability as a percent that keeps its meaning at both ends: one decimal
    ('38.2 %'), scientific notation below 0.1 % ('3.1e-03 %' is 0.0031 %), '> 99.9 %' where
    one decimal would round up to 100, and '0 % (underflow)' for an exact 0 (a float32 softmax
    can underflow when the logits are far apart)."""
    percent = 100 * float(p)
    if percent <= 0:
        return "0 % (underflow)"
    if percent < 0.1:
        return f"{percent:.1e} %"
    if percent >= 99.95:
        return "> 99.9 %"
    return f"{percent:.1f} %"


def row_percentages(cm, decimals: int = 1) -> np.ndarray:
    """Each row of a confusion matrix as percentages of the row's total, rounded to `decimals`
    by the largest-remainder method, so that every non-empty row adds up to exactly 100 as
    written (plain rounding can give 99.9 or 100.1). Empty rows stay 0."""
    cm = np.asarray(cm, dtype=np.float64)
    unit = 10.0 ** -decimals                                       # e.g. 0.1 %
    total = cm.sum(1, keepdims=True)
    exact = np.where(total > 0, 100 * cm / np.maximum(total, 1), 0) / unit   # in units of 0.1 %
    floor = np.floor(exact + 1e-9)
    short = np.where(total[:, 0] > 0, np.rint(100 / unit - floor.sum(1)), 0).astype(int)
    for i, k in enumerate(short):
        if k > 0:                                                  # hand the missing units to the
            floor[i, np.argsort(-(exact[i] - floor[i]), kind="stable")[:k]] += 1   # largest remainders
    return np.round(floor * unit, decimals)


def save_figure(fig, path) -> Path:
    """Save `fig` as PNG (or the suffix's format) via a temporary file and a rename."""
    path = Path(path)
    with atomic_write(path) as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    return path


def image_grid(images, titles=None, *, ncols: int = 8, title: str | None = None, title_colors=None,
               size: float = 1.4):
    """Show uint8 HWC images in a grid with optional per-image titles (and title colours)."""
    n = len(images)
    nrows = max(1, -(-n // ncols))
    lines = max((str(t).count("\n") + 1 for t in titles), default=0) if titles is not None else 0
    row_height = size + 0.18 * lines  # room for the titles above each row
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * row_height + (0.4 if title else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=8,
                             color=title_colors[i] if title_colors is not None else "black")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def class_examples(images, labels, classes, *, per_class: int = 8, seed: int = 0):
    """A row of random examples for every class, labelled on the left."""
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(classes), per_class, figsize=(per_class * 1.1, len(classes) * 1.1))
    for c, name in enumerate(classes):
        idx = rng.choice(np.flatnonzero(np.asarray(labels) == c), per_class, replace=False)
        for j, i in enumerate(idx):
            ax = axes[c, j]
            ax.imshow(images[i], interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle("CIFAR-10: random training examples per class")
    fig.tight_layout()
    return fig


def class_counts(counts_by_split: dict[str, dict[str, int]]):
    """Bar chart of images per class for each split."""
    fig, ax = plt.subplots(figsize=(9, 3.5))
    width = 0.8 / len(counts_by_split)
    for k, (split, counts) in enumerate(counts_by_split.items()):
        x = np.arange(len(counts)) + k * width
        ax.bar(x, list(counts.values()), width, label=split)
    ax.set_xticks(np.arange(len(counts)) + width * (len(counts_by_split) - 1) / 2)
    ax.set_xticklabels(list(counts), rotation=30)
    ax.set_ylabel("images"), ax.set_title("Images per class")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)   # beside the axes: covers no bar
    fig.tight_layout()
    return fig


def channel_histograms(images, mean=None, bins: int = 64):
    """Pixel-intensity histogram of each RGB channel, one panel each, the channel mean marked."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), sharey=True)
    tallest = 0.0
    for c, (ax, color) in enumerate(zip(axes, ("red", "green", "blue"))):
        values = np.asarray(images)[..., c].ravel()
        heights, _, _ = ax.hist(values, bins=bins, range=(0, 255), color=color, histtype="stepfilled",
                                alpha=0.5, density=True)
        tallest = max(tallest, float(np.max(heights)))
        if mean is not None:
            ax.axvline(mean[c] * 255, color="black", linestyle="--", linewidth=1,
                       label=f"mean {mean[c] * 255:.0f}")
            ax.legend(fontsize=8, loc="upper right")
        ax.set_xlabel("pixel value (0-255)"), ax.set_title(f"{color} channel")
    axes[0].set_ylabel("density")
    axes[0].set_ylim(0, 1.3 * tallest)      # (shared) headroom: the legends sit above every bar
    fig.suptitle("Pixel intensities per channel")
    fig.tight_layout()
    return fig


def lr_schedule(lrs, steps_per_epoch: int | None = None, title: str = "Learning rate at every step"):
    """The LR at every optimizer step, with epoch boundaries and the peak marked."""
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.plot(np.arange(len(lrs)), lrs)
    peak = int(np.argmax(lrs))
    ax.plot(peak, lrs[peak], "o", color="red")
    ax.annotate(f"peak {lrs[peak]:.2e} at step {peak}", (peak, lrs[peak]), textcoords="offset points",
                xytext=(8, -12), fontsize=8)
    if steps_per_epoch:
        for e in range(steps_per_epoch, len(lrs), steps_per_epoch):
            ax.axvline(e, color="grey", linewidth=0.3)
    ax.set_xlabel("step (batch)"), ax.set_ylabel("learning rate"), ax.set_title(title)
    fig.tight_layout()
    return fig


def lr_range_test(result, lr_max: float | None = None, lr_min: float | None = None, *,
                  reference: float | None = None, title: str | None = None):
    """helpers.lr_finder.range_test's result against the LR (log scale): each batch's loss (faint),
    the smoothed loss, ln 10 (the loss of a uniform guess) and the LR each rule of
    `lr_finder.rules` reads off (the grey bands: the first and last steps, which they skip);
    optionally the chosen LR_MAX and LR_MIN and S10's LR_MAX (`reference`) as vertical lines.
    Returns the Figure."""
    from .lr_finder import rules

    lrs, losses = np.asarray(result.lrs), np.asarray(result.losses)
    fig, ax = plt.subplots(figsize=(9, 4.6))
    if len(result.raw_losses) == len(lrs):
        ax.plot(lrs, result.raw_losses, color="tab:blue", alpha=0.3, lw=1, label="each batch's loss")
    ax.plot(lrs, losses, color="tab:blue", lw=2, label="smoothed loss (lags the batches)")
    ax.axhline(np.log(10), color="grey", linestyle=":", label="ln 10 = 2.30: a uniform guess")
    lo, hi = result.skip_start, len(lrs) - result.skip_end
    if lo > 0:
        ax.axvspan(lrs[0], lrs[lo], color="grey", alpha=0.12, label="first and last steps: the rules skip them")
    if hi < len(lrs):
        ax.axvspan(lrs[hi - 1], lrs[-1], color="grey", alpha=0.12)
    for (name, lr), marker in zip(rules(result).items(), "ovs"):
        i = int(np.argmin(np.abs(np.log(lrs) - np.log(lr))))
        ax.plot(lrs[i], losses[i], marker, markersize=8, label=f"{name}: {lr:.2e}")
    low = lo + int(np.argmin(losses[lo:hi]))
    ax.plot(lrs[low], losses[low], "x", color="black", markersize=8, label=f"lowest smoothed loss: {lrs[low]:.2e}")
    for value, color, style, width, name in ((lr_max, "green", "-", 2.5, "LR_MAX"), (lr_min, "orange", "--", 1, "LR_MIN"),
                                             (reference, "black", ":", 1.5, "S10's LR_MAX")):
        if value is not None:        # S10's dotted over a wide LR_MAX: both show when they nearly coincide
            ax.axvline(value, color=color, linestyle=style, lw=width, label=f"{name} {value:.2e}")
    ax.set_xscale("log")
    top = max(losses[: hi].max(), np.log(10)) * 1.15
    ax.set_ylim(0, top)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    stop = ", stopped early: the loss diverged" if result.diverged else ""
    ax.set_title(title or f"LR range test: {len(lrs)} of {result.num_iter} iterations{stop}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.tight_layout()
    return fig


def training_curves(history: dict, eval_name: str | None = None, target: float | None = None):
    """Loss and accuracy (%) per epoch for train and test (or validation), and the LR at every
    step against the epoch; `target` (e.g. 0.90) draws the accuracy goal as a line. The run's
    final test reading (history["test"], with the recipe's test-time augmentation) gets a star
    at the epoch whose weights it read (the last, or the one early stopping kept) where it
    differs from that epoch's point."""
    eval_name = eval_name or history.get("eval_set", "test")
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(epochs, history["train_loss"], "o-", label="train")
    axes[0].plot(epochs, np.asarray(history["eval_loss"], dtype=float), "o-", label=eval_name)   # None: not read
    axes[0].set_ylabel("loss"), axes[0].set_title("Loss per epoch")
    axes[1].plot(epochs, 100 * np.asarray(history["train_acc"]), "o-", label="train")
    axes[1].plot(epochs, 100 * np.asarray(history["eval_acc"], dtype=float), "o-", label=eval_name)
    axes[1].set_ylabel("accuracy (%)"), axes[1].set_title("Accuracy per epoch")
    final, kept = (history.get("test") or {}).get("acc"), history.get("best_epoch", -1)
    at = kept if kept is not None and kept >= 0 else len(epochs) - 1          # early stopping kept that epoch
    if final is not None and (eval_name != "test" or final != history["eval_acc"][at]):
        axes[1].plot(epochs[at], 100 * final, "*", markersize=12, color="C3", label=f"final test {100 * final:.2f} %")
    if target is not None:
        axes[1].axhline(100 * target, color="grey", linestyle=":", label=f"target {100 * target:g} %")
    if "best_epoch" in history and history["best_epoch"] >= 0:
        axes[1].axvline(history["best_epoch"] + 1, color="grey", linestyle="--", label="best epoch")
    for ax in axes[:2]:
        ax.set_xlabel("epoch"), ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    lrs = np.asarray(history["lr"])
    steps_per_epoch = len(lrs) / max(len(epochs), 1)
    axes[2].plot(np.arange(1, len(lrs) + 1) / steps_per_epoch, lrs)   # step k ends at epoch k/steps
    axes[2].set_xlim(0, len(epochs))
    axes[2].set_xlabel("epoch"), axes[2].set_ylabel("learning rate"), axes[2].set_title("LR at every step")
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def compare_runs(histories: dict, eval_name: str = "validation"):
    """Several runs' per-epoch histories side by side: the training loss (dashed) and the held-out
    loss, then the held-out accuracy (%), one colour per run ({name: history})."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for (name, h), color in zip(histories.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        epochs = np.arange(1, len(h["eval_acc"]) + 1)
        axes[0].plot(epochs, h["train_loss"], "--", color=color, label=f"{name}: train")
        axes[0].plot(epochs, np.asarray(h["eval_loss"], dtype=float), "o-", color=color, label=f"{name}: {eval_name}")
        axes[1].plot(epochs, 100 * np.asarray(h["eval_acc"], dtype=float), "o-", color=color, label=name)
    axes[0].set_ylabel("loss"), axes[0].set_title("Loss per epoch")
    axes[1].set_ylabel(f"{eval_name} accuracy (%)"), axes[1].set_title(f"{eval_name.capitalize()} accuracy per epoch")
    for ax in axes:
        ax.set_xlabel("epoch"), ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def confusion_matrix(cm, classes, normalize: bool = False, title: str = "Confusion matrix"):
    """Heatmap of true class (rows) against predicted class (columns): counts in the cells, or
    with normalize=True the percentage of each true class (every row adds up to 100)."""
    cm = np.asarray(cm)
    # normalised: percent (0-100) in the cells and on the colour bar alike, one decimal,
    # rounded so that each row's numbers add up to exactly 100 (row_percentages)
    shown = row_percentages(cm) if normalize else cm
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(shown, cmap="Blues", **({"vmin": 0, "vmax": 100} if normalize else {}))
    bar = fig.colorbar(im, ax=ax, fraction=0.046)
    bar.set_label("% of the true class (row)" if normalize else "images")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    thresh = (100 if normalize else shown.max()) / 2 if shown.size else 0
    for i in range(len(classes)):
        for j in range(len(classes)):
            text = f"{shown[i, j]:.1f}" if normalize else str(int(cm[i, j]))
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if shown[i, j] > thresh else "black")
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title)
    fig.tight_layout()
    return fig


def prediction_grid(images, labels, preds, *, classes, ncols: int = 8, title: str | None = None):
    """The VGG exercise's picture: each image titled with its prediction, green if right, red if wrong."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    titles = [f"{classes[p]}" + ("" if p == t else f"\n(true: {classes[t]})") for t, p in zip(labels, preds)]
    colors = ["green" if p == t else "red" for t, p in zip(labels, preds)]
    n_ok = int((labels == preds).sum())
    return image_grid(images, titles, ncols=ncols, title=title or f"Predictions: {n_ok}/{len(labels)} correct "
                      "(green right, red wrong)", title_colors=colors, size=1.6)


def misclassified_title(true_name: str, pred_name: str, p_true: float, p_pred: float) -> str:
    """'pred: ship (> 99.9 %)' over 'true: airplane (3.1e-03 %)': each class with its probability."""
    return f"pred: {pred_name} ({format_probability(p_pred)})\ntrue: {true_name} ({format_probability(p_true)})"


def misclassified(images, labels, preds, *, probs, classes, ncols: int = 5, title: str | None = None):
    """Wrong predictions: the predicted class with its probability, and the true class with
    the probability the model gave it (low p(true) = confidently wrong = high loss), both as
    format_probability writes them (tiny ones in scientific notation, never a bare 0.00)."""
    titles = [misclassified_title(classes[t], classes[p], pr[t], pr[p]) for t, p, pr in zip(labels, preds, probs)]
    return image_grid(images, titles, ncols=ncols, title=title or "Misclassified images, highest loss first",
                      title_colors=["red"] * len(labels), size=1.9)


def probability_bars(images, probs, classes, *, labels=None, top: int | None = None, values: bool = True):
    """The Keras CNN's picture: each image beside a bar chart of its class probabilities, with
    (values=True) each probability of 0.5 % or more written beside its bar."""
    n = len(images)
    fig, axes = plt.subplots(n, 2, figsize=(8, 1.9 * n), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.2]})
    for i in range(n):
        p = np.asarray(probs[i])
        order = np.argsort(-p)[:top] if top else np.arange(len(classes))
        axes[i, 0].imshow(images[i], interpolation="nearest")
        axes[i, 0].axis("off")
        if labels is not None:
            axes[i, 0].set_title(f"true: {classes[labels[i]]}", fontsize=9)
        pred = int(np.argmax(p))
        truth = None if labels is None else int(labels[i])
        colors = [("green" if truth in (None, k) else "red") if k == pred else
                  "tab:blue" if k == truth else "grey" for k in order]
        axes[i, 1].barh([classes[k] for k in order][::-1], p[order][::-1], color=colors[::-1])
        if values:
            for row, k in enumerate(order[::-1]):       # the value beside every bar of 0.5 % or more
                if p[k] >= 0.005:                        # inside a long bar, in white; else after it
                    inside = p[k] > 0.8
                    axes[i, 1].text(p[k] - 0.01 if inside else p[k] + 0.01, row, format_probability(p[k]),
                                    va="center", ha="right" if inside else "left", fontsize=7,
                                    color="white" if inside else "black")
        axes[i, 1].set_xlim(0, 1)
        axes[i, 1].tick_params(labelsize=8)
        axes[i, 1].set_xlabel("probability", fontsize=8)
    fig.suptitle("Class probabilities (green: predicted and right; red: predicted and wrong, blue: the true class)")
    fig.tight_layout()
    return fig


def grad_cam_pairs(images, cam_pred, cam_true, *, labels, preds, classes, alpha: float = 0.5):
    """One row per image: the image, where the model looked for its (wrong) prediction, and
    where it looked for the true class (Grad-CAM heatmaps over the image)."""
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(6.3, 2.1 * n), squeeze=False)
    for i in range(n):
        heads = ("image", f"for pred: {classes[preds[i]]}", f"for true: {classes[labels[i]]}")
        for ax, cam, head in zip(axes[i], (None, cam_pred[i], cam_true[i]), heads):
            ax.imshow(images[i], interpolation="nearest")
            if cam is not None:
                ax.imshow(cam, cmap="jet", alpha=alpha, vmin=0, vmax=1, interpolation="bilinear")
            ax.set_title(head, fontsize=8, color="red" if "pred" in head else "black")
            ax.axis("off")
    fig.suptitle("Grad-CAM: where the model looked (red = most evidence)")
    fig.tight_layout()
    return fig


def pad_crop(images, crop_yx, *, pad: int, title: str | None = None, size: float = 1.7):
    """S10's pad-and-crop made visible, one column per image: on top the image
    reflect-padded to (32 + 2*pad) pixels, with its original place (dashed white box) and the
    random 32x32 crop window (yellow box); below, the crop, i.e. what the network sees, with
    the original's border dashed (outside it: reflected pixels). `crop_yx` holds each
    window's top-left corner in the padded image (0..2*pad, pad = no shift), as
    augment.BatchAugment.sample draws it; the titles give the window's shift (dy, dx): the
    picture inside it moves by (-dy, -dx)."""
    from matplotlib.patches import Rectangle

    images, crop_yx = np.asarray(images), np.asarray(crop_yx)
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(n * size, 2 * size + 0.9), squeeze=False)
    for i in range(n):
        padded = np.pad(images[i], ((pad, pad), (pad, pad), (0, 0)), mode="reflect")   # == BORDER_REFLECT_101
        cy, cx = (int(v) for v in crop_yx[i])
        dy, dx = cy - pad, cx - pad
        top, bottom = axes[0, i], axes[1, i]
        top.imshow(padded, interpolation="nearest")
        top.add_patch(Rectangle((pad - 0.5, pad - 0.5), 32, 32, fill=False, color="white", lw=1.2, ls="--"))
        top.add_patch(Rectangle((cx - 0.5, cy - 0.5), 32, 32, fill=False, color="yellow", lw=2))
        top.set_title(f"(dy, dx) = ({dy:+d}, {dx:+d})" + ("\nno shift" if (dy, dx) == (0, 0) else ""),
                      fontsize=8)
        bottom.imshow(padded[cy:cy + 32, cx:cx + 32], interpolation="nearest")
        bottom.add_patch(Rectangle((-dx - 0.5, -dy - 0.5), 32, 32, fill=False, color="white", lw=1.2, ls="--"))
        bottom.set_xlim(-0.5, 31.5), bottom.set_ylim(31.5, -0.5)
        top.set_xlim(-1.5, 32 + 2 * pad + 0.5), top.set_ylim(32 + 2 * pad + 0.5, -1.5)   # boxes on the edge show
        for ax in (top, bottom):
            ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].set_ylabel(f"padded {32 + 2 * pad}x{32 + 2 * pad}", fontsize=8)
    axes[1, 0].set_ylabel("the 32x32 crop", fontsize=8)
    fig.suptitle(title or f"Pad {pad} (reflect) + random 32x32 crop: yellow = the crop window, "
                 "dashed = the original image", fontsize=10)
    fig.tight_layout()
    return fig


def cutout_geometry(image, crop_yx, hole_yx, *, pad: int, cutout_pad: int, hole: int, fill=None):
    """S10's two paddings on one image: the 40x40 reflect-padded frame with the random
    32x32 crop box, then the crop padded to 48x48 with the 8x8 hole (filled with `fill`, the
    pipeline's mean pixel, augment.mean_fill(mean), when given; outlined in red) and the centre
    crop box."""
    from matplotlib.patches import Rectangle

    img = np.asarray(image)
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    cy, cx = crop_yx
    crop = padded[cy:cy + 32, cx:cx + 32]
    framed = np.pad(crop, ((cutout_pad, cutout_pad), (cutout_pad, cutout_pad), (0, 0)))
    hy, hx = hole_yx[0] + cutout_pad, hole_yx[1] + cutout_pad        # hole in the 48x48 frame
    if fill is not None:                                             # as CoarseDropout fills it
        framed[hy:hy + hole, hx:hx + hole] = np.asarray(fill, dtype=framed.dtype)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].imshow(padded, interpolation="nearest")
    axes[0].add_patch(Rectangle((cx - 0.5, cy - 0.5), 32, 32, fill=False, color="yellow", lw=2))
    axes[0].set_title(f"1. reflect-padded to {32 + 2 * pad}: crop box at (y={cy - pad:+d}, x={cx - pad:+d})",
                      fontsize=9)
    axes[1].imshow(framed, interpolation="nearest")
    axes[1].add_patch(Rectangle((hx - 0.5, hy - 0.5), hole, hole, fill=False, color="red", lw=1.5))
    axes[1].add_patch(Rectangle((cutout_pad - 0.5, cutout_pad - 0.5), 32, 32, fill=False, color="yellow", lw=2))
    axes[1].set_title(f"2. padded to {32 + 2 * cutout_pad}: hole (red) at (y={hole_yx[0]:+d}, x={hole_yx[1]:+d}), "
                      "centre crop kept", fontsize=9)
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    return fig


def study(rows, title: str = "S10's overfitting study", held_out: str = "test"):
    """Train and held-out accuracy (%) of each variant of helpers.study, the gap written beside;
    `held_out` names what the rows were scored on (a record's settings["held_out"])."""
    names = [r["variant"] for r in rows]
    train = 100 * np.array([r["train_acc"] for r in rows])
    test = 100 * np.array([r["test_acc"] for r in rows])
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.2))
    ax.barh(y + 0.2, train, 0.4, label="train (clean images, eval mode)")
    ax.barh(y - 0.2, test, 0.4, label=held_out)
    for i in range(len(rows)):
        ax.text(max(train[i], test[i]) + 0.5, y[i], f"gap {train[i] - test[i]:+.1f}", va="center", fontsize=8)
    ax.set_yticks(y, names), ax.invert_yaxis()
    ax.set_xlabel("accuracy (%)"), ax.set_xlim(0, 110), ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)   # beside the axes: covers no bar
    fig.tight_layout()
    return fig


def whitening_filters(weights, eigenvalues, title: str = "Whitening filters: 2x2 RGB weights (grey = 0), "
                      "each titled with its eigenvalue λ, the patches' variance along it"):
    """The fast net's whitening filters, each (3, 2, 2) shown as a 2x2 colour patch (scaled
    to 0..1 on its own, grey = 0), titled "λ = " its eigenvalue, largest first."""
    w = np.asarray(weights, dtype=np.float64)
    scale = np.abs(w).reshape(len(w), -1).max(1)[:, None, None, None]
    patches = (0.5 + 0.5 * w / np.where(scale > 0, scale, 1)).transpose(0, 2, 3, 1)   # N, 2, 2, 3
    return image_grid(patches, [f"λ = {float(v):.2g}" for v in eigenvalues], ncols=len(w), title=title, size=1.1)


def close(fig) -> None:
    plt.close(fig)
