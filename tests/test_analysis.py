"""Error analysis beyond the confusion matrix: Grad-CAM, the history table, the study figure."""
import numpy as np
import pytest
import torch

from helpers import analysis, plots
from helpers.models import get_model

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def square_images(n=4, side=8, seed=0):
    """Grey images with one bright square each, at a random place."""
    rng = np.random.default_rng(seed)
    images = np.full((n, 32, 32, 3), 100, np.uint8)
    corners = rng.integers(0, 32 - side, (n, 2))
    for im, (y, x) in zip(images, corners):
        im[y:y + side, x:x + side] = 250
    return images, corners


@pytest.mark.parametrize("name", ["resnet9", "vgg", "compact"])
def test_grad_cam_gives_one_normalised_map_per_image_and_class(name):
    torch.manual_seed(0)
    model = get_model(name).eval()
    images, _ = square_images()
    cams = analysis.grad_cam(model, images, [0, 3, 5, 9], stats=(MEAN, STD))
    assert cams.shape == (4, 32, 32)
    assert np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1 + 1e-6
    # evidence for different classes differs (the gradient of each class's logit is its own)
    other = analysis.grad_cam(model, images, [1, 1, 1, 1], stats=(MEAN, STD))
    assert not np.allclose(cams, other)


def test_grad_cam_lights_up_the_evidence_the_model_uses():
    """A model whose class-1 logit is the amount of bright pixels: Grad-CAM for class 1 must
    light up each image's bright square and nothing else."""

    class BrightnessProbe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            conv = torch.nn.Conv2d(3, 1, 1)
            torch.nn.init.constant_(conv.weight, 1 / 3)
            torch.nn.init.zeros_(conv.bias)
            self.features = torch.nn.Sequential(conv, torch.nn.ReLU())   # > 0 only on bright pixels

        def forward(self, x):
            score = self.features(x).mean((1, 2, 3))
            return torch.stack([torch.zeros_like(score), score], 1)

    images, corners = square_images(3)
    model = BrightnessProbe()
    cams = analysis.grad_cam(model, images, [1, 1, 1], stats=(MEAN, STD), layer=model.features)
    for cam, (y, x) in zip(cams, corners):
        inside = np.zeros((32, 32), bool)
        inside[y:y + 8, x:x + 8] = True
        assert cam[inside].min() > 0.9 and cam[~inside].max() < 0.1


def test_cam_layer_is_the_last_convolutional_block():
    from helpers.models import ResNet9

    model = ResNet9()
    assert analysis.cam_layer(model) is model.layer3
    with pytest.raises(TypeError, match="no Grad-CAM layer"):
        analysis.cam_layer(torch.nn.Linear(2, 2))


def test_history_table_has_one_row_per_epoch_with_its_last_lr():
    history = {"train_loss": [1.5, 0.9], "train_acc": [0.4, 0.7], "eval_loss": [1.2, 0.8],
               "eval_acc": [0.55, 0.75], "lr": [1e-4, 5e-4, 1e-3, 2e-4], "seconds": [3.0, 3.0]}
    lines = analysis.history_table(history).splitlines()
    assert len(lines) == 4                                   # header, rule, two epochs
    assert lines[2].split() == ["1/2", "1.5000", "40.00%", "1.2000", "55.00%", "5.00e-04"]
    assert lines[3].split()[-1] == "2.00e-04"


def test_training_curves_draw_the_target_with_its_decimals():
    history = {"train_loss": [1.5, 0.9], "train_acc": [0.4, 0.7], "eval_loss": [1.2, 0.8],
               "eval_acc": [0.55, 0.75], "lr": [1e-4, 5e-4, 1e-3, 2e-4], "seconds": [3.0, 3.0]}
    for target, label in ((0.935, "target 93.5 %"), (0.9, "target 90 %")):
        fig = plots.training_curves(history, target=target)
        assert label in [line.get_label() for line in fig.axes[1].get_lines()]
        plots.close(fig)


def test_training_curves_star_the_final_test_reading_where_it_differs():
    """With TTA the final test reading differs from the last epoch's point: a star shows it;
    without TTA it is that point, drawn once; after a validation split it is always new."""
    history = {"train_loss": [1.5, 0.9], "train_acc": [0.4, 0.7], "eval_loss": [1.2, 0.8],
               "eval_acc": [0.55, 0.75], "lr": [1e-4, 5e-4, 1e-3, 2e-4], "seconds": [3.0, 3.0]}
    for test, eval_set, star in ((0.78, "test", True), (0.75, "test", False), (0.75, "validation", True)):
        fig = plots.training_curves({**history, "test": {"acc": test, "loss": 0.7}, "eval_set": eval_set})
        stars = [line for line in fig.axes[1].get_lines() if line.get_marker() == "*"]
        assert len(stars) == star and (not star or list(stars[0].get_ydata()) == [100 * test])
        plots.close(fig)
    kept = {**history, "best_epoch": 0, "test": {"acc": 0.6, "loss": 0.9}, "eval_set": "validation"}
    fig = plots.training_curves(kept)                 # early stopping kept epoch 1: the test read its weights
    assert [list(line.get_xdata()) for line in fig.axes[1].get_lines() if line.get_marker() == "*"] == [[1]]
    plots.close(fig)


def test_compare_runs_draws_one_colour_per_run_in_percent():
    a = {"train_loss": [1.5, 0.9], "eval_loss": [1.2, 0.8], "eval_acc": [0.55, 0.75]}
    b = {"train_loss": [1.6, 1.1], "eval_loss": [1.3, 1.0], "eval_acc": [0.50, 0.62]}
    fig = plots.compare_runs({"LR 2.6e-3": a, "LR 1e-3": b})
    loss, acc = fig.axes
    assert [line.get_label() for line in acc.get_lines()] == ["LR 2.6e-3", "LR 1e-3"]
    assert list(acc.get_lines()[1].get_ydata()) == [50.0, 62.0]                 # accuracy in %
    assert len(loss.get_lines()) == 4 and acc.get_lines()[0].get_color() == loss.get_lines()[0].get_color()
    assert "validation" in acc.get_ylabel()
    plots.close(fig)


def test_study_and_grad_cam_figures_draw():
    rows = [{"variant": "a", "train_acc": 0.9, "test_acc": 0.8}, {"variant": "b", "train_acc": 0.7, "test_acc": 0.7}]
    fig = plots.study(rows)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["a", "b"]
    plots.close(fig)
    images, _ = square_images(2)
    fig = plots.grad_cam_pairs(images, np.zeros((2, 32, 32)), np.ones((2, 32, 32)), labels=[0, 1], preds=[1, 0],
                               classes=[f"c{i}" for i in range(10)])
    assert len(fig.axes) == 6 and fig.axes[1].get_title() == "for pred: c1"
    plots.close(fig)


def test_predict_collects_logits_probabilities_and_per_image_losses():
    """Predictions line up with the images: probabilities are the softmax, preds the argmax,
    losses each image's cross-entropy."""
    torch.manual_seed(0)
    model = get_model("compact").eval()
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 24)
    pred = analysis.predict(model, images, labels, stats=(MEAN, STD), batch_size=10)    # 3 batches, the last partial
    logits = torch.from_numpy(pred.logits)
    assert pred.logits.shape == (24, 10) and np.array_equal(pred.labels, labels)
    assert np.allclose(pred.probs, torch.softmax(logits, 1).numpy(), atol=1e-6)
    assert np.array_equal(pred.preds, pred.logits.argmax(1))
    want = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels), reduction="none").numpy()
    assert np.allclose(pred.losses, want, atol=1e-5)
    assert pred.accuracy == pytest.approx((pred.preds == labels).mean())


def test_misclassified_by_loss_lists_only_wrong_answers_most_confident_first():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.05, 0.9, 0.05], [0.3, 0.3, 0.4]], np.float32))
    labels = np.array([0, 0, 2, 2])          # right, wrong (p 0.1), wrong (p 0.05), right
    probs = np.exp(logits)
    pred = analysis.Predictions(logits, labels, probs, probs.argmax(1), -np.log(probs[np.arange(4), labels]))
    assert list(analysis.misclassified_by_loss(pred)) == [2, 1]
    assert list(analysis.misclassified_by_loss(pred, k=1)) == [2]


def test_confusion_matrix_and_top_confused_pairs():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 0, 0, 0, 1, 2, 1])
    cm = analysis.confusion_matrix(labels, preds, 3)
    assert cm.tolist() == [[1, 2, 0], [3, 1, 0], [0, 1, 1]]          # rows: true class
    assert analysis.top_confused_pairs(cm, ("a", "b", "c")) == [("b", "a", 3), ("a", "b", 2), ("c", "b", 1)]
    assert analysis.top_confused_pairs(cm, ("a", "b", "c"), k=1) == [("b", "a", 3)]
    assert analysis.top_confused_pairs(np.eye(3, dtype=int), "abc") == []   # no mistakes, no pairs
