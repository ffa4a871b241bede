"""The course's figures say what they mean (issue 23): probabilities that keep their precision,
a row-normalised confusion matrix in percent whose rows add up to 100, a pad-and-crop figure
that shows the pipeline's crop, the cutout hole drawn mean-filled, legends that cover no bar."""
import numpy as np
import pytest
import torch

from helpers import augment, plots

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
CLASSES = [f"c{i}" for i in range(10)]


@pytest.mark.parametrize("p, text", [(0.38, "38.0 %"), (0.001, "0.1 %"), (0.999, "99.9 %"), (0.99999, "> 99.9 %"),
                                     (1.0, "> 99.9 %"), (3.1e-7, "3.1e-05 %"), (0.0, "0 % (underflow)")])
def test_format_probability_keeps_its_precision_at_both_ends(p, text):
    assert plots.format_probability(p) == text


def test_misclassified_titles_never_round_a_tiny_p_true_to_zero():
    probs = np.full((2, 10), 1e-9)
    probs[0, 3], probs[0, 5] = 0.69, 2.4e-6            # pred c3, true c5
    probs[1, 1], probs[1, 0] = 1.0, 0.0                # pred c1, true c0 underflowed
    fig = plots.misclassified(np.zeros((2, 32, 32, 3), np.uint8), [5, 0], [3, 1], probs=probs, classes=CLASSES)
    titles = [ax.get_title() for ax in fig.axes[:2]]
    assert titles == ["pred: c3 (69.0 %)\ntrue: c5 (2.4e-04 %)", "pred: c1 (> 99.9 %)\ntrue: c0 (0 % (underflow))"]
    assert not any("0.00" in t for t in titles)
    plots.close(fig)


def test_row_percentages_add_up_to_exactly_100_as_written():
    cm = np.array([[1, 1, 1], [0, 0, 0], [911, 10, 79], [2, 3, 45]])
    shown = plots.row_percentages(cm)
    assert shown.tolist() == [[33.4, 33.3, 33.3], [0, 0, 0], [91.1, 1.0, 7.9], [4.0, 6.0, 90.0]]
    rng = np.random.default_rng(0)
    for _ in range(200):
        cm = rng.integers(0, rng.integers(1, 2000), (10, 10))
        shown = plots.row_percentages(cm)
        exact = 100 * cm / np.maximum(cm.sum(1, keepdims=True), 1)
        assert np.allclose(shown.sum(1)[cm.sum(1) > 0], 100) and np.abs(shown - exact).max() < 0.1 + 1e-9


def test_row_normalised_confusion_matrix_is_in_percent_in_cells_and_colour_bar():
    rng = np.random.default_rng(1)
    cm = rng.integers(0, 60, (10, 10)) + np.diag(rng.integers(300, 900, 10))
    fig = plots.confusion_matrix(cm, CLASSES, normalize=True)
    ax, bar = fig.axes
    cells = np.array([float(t.get_text()) for t in ax.texts]).reshape(10, 10)
    assert np.allclose(cells.sum(1), 100)                                  # rows add up to 100
    assert np.allclose(cells, 100 * cm / cm.sum(1, keepdims=True), atol=0.1)
    assert ax.images[0].get_clim() == (0, 100) and "%" in bar.get_ylabel()   # the colour bar too
    assert np.allclose(ax.images[0].get_array(), cells)
    plots.close(fig)
    fig = plots.confusion_matrix(cm, CLASSES)                              # counts stay counts
    assert [int(t.get_text()) for t in fig.axes[0].texts] == cm.ravel().tolist()
    plots.close(fig)


def test_pad_crop_shows_the_crop_the_pipeline_makes():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    crop_yx = np.array([[0, 8], [4, 4], [7, 1]])
    fig = plots.pad_crop(images, crop_yx, pad=augment.PAD)
    fast = augment.BatchAugment(MEAN, STD, crop_p=1, flip_p=0, cutout_p=0)
    params = {"crop_yx": torch.from_numpy(crop_yx), "flip": torch.zeros(3, dtype=torch.bool),
              "hole_yx": torch.zeros(3, 2, dtype=torch.long), "cutout": torch.zeros(3, dtype=torch.bool)}
    want = augment.denormalize(fast.apply(torch.from_numpy(images), params), MEAN, STD)
    crops = [np.asarray(ax.images[0].get_array()) for ax in fig.axes[3:]]
    assert all(np.array_equal(c, w) for c, w in zip(crops, want))
    assert [ax.get_title() for ax in fig.axes[:3]] == ["(dy, dx) = (-4, +4)", "(dy, dx) = (+0, +0)\nno shift",
                                                       "(dy, dx) = (+3, -3)"]
    plots.close(fig)


def test_cutout_geometry_draws_the_hole_filled_with_the_mean():
    image = np.zeros((32, 32, 3), np.uint8)
    fill = augment.mean_fill(MEAN)
    fig = plots.cutout_geometry(image, crop_yx=(4, 4), hole_yx=(2, 20), pad=4, cutout_pad=8, hole=8, fill=fill)
    framed = np.asarray(fig.axes[1].images[0].get_array())
    assert (framed[10:18, 28:36] == fill).all() and (framed[9, 28:36] == 0).all()
    plots.close(fig)


def test_class_counts_legend_covers_no_bar():
    counts = {"train": {c: 5000 for c in CLASSES}, "test": {c: 1000 for c in CLASSES}}
    fig = plots.class_counts(counts)
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert not any(legend.overlaps(bar.get_window_extent()) for bar in ax.patches)
    plots.close(fig)


def test_probability_bars_write_each_visible_probability():
    probs = np.array([[0.55, 0.4, 0.04, 0.01] + [0.0] * 6])
    fig = plots.probability_bars(np.zeros((1, 32, 32, 3), np.uint8), probs, CLASSES, labels=[1])
    assert sorted(t.get_text() for t in fig.axes[1].texts) == ["1.0 %", "4.0 %", "40.0 %", "55.0 %"]
    plots.close(fig)
