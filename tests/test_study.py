"""S10's overfitting study: the variants it compares and a smoke run on real images."""
import dataclasses
import json

import pytest

from helpers import config, study
from helpers.errors import ConfigError


def test_variants_change_one_regulariser_at_a_time_from_the_seed_recipe():
    recipes = study.study_recipes(smoke=False)
    seed = config.recipe("resnet9", smoke=False)
    assert seed.dropout == config.DROPOUT == 0.1
    assert recipes["no regularisation"].dropout == 0 and recipes["no regularisation"].weight_decay == 0
    assert recipes["dropout 0.1 (S10's)"].dropout == 0.1
    assert [recipes[k].weight_decay for k in ("dropout + weight decay 1e-3", "dropout + weight decay 1e-2")] == [1e-3, 1e-2]
    tuned = recipes["resnet9-tuned (Page)"]
    assert (tuned.optimizer, tuned.label_smoothing, tuned.tta_flip) == ("sgd", 0.2, True)
    for r in recipes.values():
        assert (r.epochs, r.peak_epoch, r.batch_size) == (study.EPOCHS, study.PEAK_EPOCH, seed.batch_size)
        assert (r.model, r.augment) == ("resnet9", "crop-flip-cutout")


def test_smoke_study_trains_every_variant_on_real_images(small_data):
    from helpers.hardware import RunOptions

    result = study.run_study(small_data, RunOptions("cpu"), smoke=True, log=lambda *a: None)
    rows = result["rows"]
    assert [r["variant"] for r in rows] == list(study.VARIANTS)
    assert result["settings"]["train_images"] == 10 * study.SMOKE_TRAIN_PER_CLASS
    assert result["settings"]["test_images"] == 10 * study.SMOKE_TEST_PER_CLASS
    for r in rows:
        assert 0 <= r["train_acc"] <= 1 and 0 <= r["test_acc"] <= 1 and r["seconds"] > 0
        assert r["gap"] == pytest.approx(r["train_acc"] - r["test_acc"])
    table = study.format_rows(rows).splitlines()
    assert len(table) == 2 + len(rows) and table[2].startswith("no regularisation")


def test_load_study_reads_a_record_and_explains_a_missing_one(tmp_path):
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"rows": [], "settings": {}}))
    assert study.load_study(path) == {"rows": [], "settings": {}}
    with pytest.raises(ConfigError, match=r"cannot read the study's results missing.json \(FileNotFoundError\): "
                                          r"make it with `python -m helpers.study`"):
        study.load_study(tmp_path / "missing.json")


def test_fast_ablation_leaves_out_one_ingredient_per_row():
    """The record's rows measure the first fast recipe (config.FIRST_FAST), so a row run today does too."""
    import dataclasses

    recipes = study.study_recipes(smoke=False, study="fast")
    full = dataclasses.replace(config.recipe("fast", smoke=False), **config.FIRST_FAST)
    base = recipes["fast recipe"]
    s = study.STUDIES["fast"]
    assert (base.epochs, base.peak_epoch, base.batch_size) == (s.epochs, s.peak_epoch, s.batch_size)
    assert base.eval_every == 1                                           # a study reads every epoch
    assert base.replace(epochs=full.epochs, peak_epoch=full.peak_epoch, batch_size=full.batch_size,
                        test_batch_size=full.test_batch_size, eval_every=full.eval_every) == full
    changed = {}
    for name, r in recipes.items():
        diff = {k for k, v in r.to_dict().items() if v != base.to_dict()[k]}
        changed[name] = diff
        assert r.model == "fast" and len(diff) <= 2, (name, diff)
    assert changed["fast recipe"] == set()
    assert changed["no label smoothing"] == {"label_smoothing"}
    assert changed["no augmentation"] == {"augment"}
    assert changed["no whitening (the 2x2 conv learned)"] == {"whiten"}
    assert recipes["S10's augmentation (half pad-crop 4, flip, cutout)"].augment == "crop-flip-cutout"


def test_smoke_fast_ablation_runs_on_real_images(small_data):
    from helpers.hardware import RunOptions

    result = study.run_study(small_data, RunOptions("cpu", fast_augment=True), smoke=True, log=lambda *a: None,
                             only=["fast recipe", "no label smoothing"], study="fast")
    assert [r["variant"] for r in result["rows"]] == ["fast recipe", "no label smoothing"]
    assert result["settings"]["study"] == "fast" and result["rows"][0]["tta_shift"] == 1
    tta = result["rows"][0]["tta_acc"]            # every TTA read off the same held-out logits
    assert list(tta) == ["none", "flip", "6 views alike", "6 views, centre 1/2"]
    assert tta["6 views alike"] == pytest.approx(result["rows"][0]["test_acc"], abs=1e-6)   # the recipe's own
    assert tta["none"] == pytest.approx(result["rows"][0]["held_out_acc_per_epoch"][-1], abs=1e-4)   # epoch 1, no TTA
    page = study.markdown({**result, "git": {"commit": "0" * 40, "dirty": False}, "device": "cpu",
                           "versions": {"torch": "x"}, "date": "today", "wall_seconds": 1.0})
    assert "| fast recipe | 0 | " + f"{tta['none']:.2%}" in page
    assert study.format_means(result["rows"], "fast recipe") in page      # the differences table, without TTA
    table = [line for line in page.split("\n\n")[2].splitlines() if line.startswith("|")]
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head[:2] == ["variant", "label smoothing"] and "optimizer" not in head   # only what differs
    assert [c.strip() for c in table[2].strip("|").split("|")][:2] == ["fast recipe", "0.2"]
    assert [c.strip() for c in table[3].strip("|").split("|")][:2] == ["no label smoothing", "0"]
    with pytest.raises(ConfigError, match="unknown study 'slow'"):
        study.run_study(small_data, study="slow")


def test_the_vgg_study_scores_on_held_out_training_images(real_data):
    """Seed 003's settings study decides on a validation split: 1,000 training images held out,
    disjoint from its 2,000 training images, stratified, and no test image anywhere."""
    import numpy as np

    from helpers.study import study_data, study_recipes

    sub = study_data(real_data, smoke=False, study="vgg")
    assert np.bincount(sub.train_labels).tolist() == [200] * 10
    assert np.bincount(sub.test_labels).tolist() == [100] * 10
    train_set = {im.tobytes() for im in real_data.train_images}
    held_out = [im.tobytes() for im in sub.test_images]
    assert all(h in train_set for h in held_out)                        # training images, not test ones
    assert not set(held_out) & {im.tobytes() for im in sub.train_images}
    recipes = study_recipes(smoke=False, study="vgg")
    assert [r.batch_size for r in recipes.values()] == [64, 32, 16, 8, 4, 64, 64]
    assert all(r.epochs == 15 and r.lr == 1e-3 and r.momentum == 0.9 for r in recipes.values())   # as stated


def test_fast_ingredients_study_leaves_out_one_of_airbench94s_ingredients_per_row():
    recipes = study.study_recipes(smoke=False, study="fast-ingredients")
    full, first = recipes[study.AIRBENCH94_ROW], recipes["the first fast recipe (before airbench94's ingredients)"]
    assert (full.epochs, full.peak_epoch, full.batch_size, full.lookahead, full.muon_lr) == (10, 2, 1024, True, None)
    assert study.STUDIES["fast-ingredients"].baseline == study.AIRBENCH94_ROW
    changes = {k for k, v in config.FIRST_FAST.items() if v != getattr(full, k)}     # the first recipe's own
    assert {k for k, v in first.to_dict().items() if v != full.to_dict()[k]} == changes and len(changes) == 13
    assert (first.lr, first.momentum, first.augment, first.lookahead) == (0.6, 0.9, "flip-translate", False)
    assert (first.lr_start, first.whiten_bias_epochs) == (None, None)       # a variant's None is kept, not ignored
    changed = {name: {k for k, v in r.to_dict().items() if v != full.to_dict()[k]} for name, r in recipes.items()
               if name.startswith("- ")}
    assert changed["- lookahead"] == {"lookahead"}
    assert changed["- BN momentum 0.4 and eps 1e-12 (PyTorch's)"] == {"bn_momentum", "bn_eps"}
    assert changed["- triangle 0.2 -> 1 -> 0.07 (1/50 -> 1 -> 1/50)"] == {"lr_start", "lr_min"}
    assert changed["- whitening bias frozen after 3 epochs (always trained)"] == {"whiten_bias_epochs"}
    assert all(1 <= len(diff) <= 5 for diff in changed.values()), changed
    assert len({frozenset(d) for d in changed.values()}) == len(changed) == 9     # no two rows alike
    muon = [r for name, r in recipes.items() if name.startswith("airbench94_muon") or name == "fast recipe"]
    assert [(r.epochs, r.batch_size, r.micro_batch, r.schedule, r.muon_lr, r.lookahead) for r in muon] == [
        (8, 2000, None, "linear", 0.24, False), (10, 2000, None, "linear", 0.24, False),   # rows keep their own length
        (10, 2000, 500, "linear", 0.24, False)]
    assert recipes["fast recipe"] == config.recipe("fast").replace(test_batch_size=256, peak_epoch=2,  # unused: linear
                                                                   eval_every=1)      # a curve per row
    sub = study.study_data(_FakeData(), study="fast-ingredients")
    assert sub == ("validation", 4500, 500)


class _FakeData:
    def validation_subset(self, train, val):
        return ("validation", train, val)


def test_seeds_give_one_row_each_and_a_mean_with_its_standard_error(small_data):
    from helpers.hardware import RunOptions

    result = study.run_study(small_data, RunOptions("cpu", fast_augment=True), smoke=True, log=lambda *a: None,
                             only=["fast recipe"], study="fast", seeds=(0, 1))
    rows = result["rows"]
    assert [(r["variant"], r["seed"]) for r in rows] == [("fast recipe", 0), ("fast recipe", 1)]
    assert rows[0]["test_acc"] != rows[1]["test_acc"] or rows[0]["train_acc"] != rows[1]["train_acc"]
    rows = [{"variant": "a", "test_acc": acc} for acc in (0.90, 0.91, 0.92)] + [{"variant": "b", "test_acc": 0.5}]
    lines = study.seed_means(rows)
    assert "| a | 3 | 91.00% | 0.58% |" in lines and "| b | 1 | 50.00% | - |" in lines   # 0.01 / sqrt(3)
    assert study.seed_means(rows[:1] + rows[3:]) == []


def test_variant_means_give_each_difference_with_its_standard_error():
    """The ablation's reading: a variant's mean over seeds, its standard error, and its difference
    from the baseline with the standard error of that difference (the two errors in quadrature)."""
    import math

    rows = [{"variant": v, "test_acc": acc + 0.01, "held_out_acc_per_epoch": [0.5, acc]}
            for v, accs in (("a", (0.90, 0.92, 0.94)), ("b", (0.88, 0.90)), ("c", (0.80,))) for acc in accs]
    means = study.variant_means(rows, study.plain_acc)
    assert means["a"] == (3, pytest.approx(0.92), pytest.approx(0.02 / math.sqrt(3)))
    assert means["b"][:2] == (2, pytest.approx(0.89)) and math.isnan(means["c"][2])
    assert study.variant_means(rows)["a"][1] == pytest.approx(0.93)          # the default: with the recipe's TTA
    table = {line.split()[0]: line.split()[1:] for line in study.format_means(rows, "a").splitlines()[2:]}
    se_b = math.hypot(0.01, 0.02 / math.sqrt(3))                             # sqrt(0.01^2 + 0.0115^2) = 1.53 %
    assert table["a"] == ["3", "92.00%", "1.15%"]
    assert table["b"] == ["2", "89.00%", "1.00%", "-3.00%", f"{se_b:.2%}"]
    assert table["c"] == ["1", "80.00%", "-", "-12.00%", "-"]


def test_the_command_writes_its_record_to_results_from_any_folder(tmp_path, monkeypatch):
    """`python -m helpers.study` without --out writes the study's file (here redirected to a
    temporary results/) whatever the working folder; --only then merges its rows into it."""
    home = tmp_path / "results" / "fast_ablation.json"
    monkeypatch.setitem(study.STUDIES, "fast", dataclasses.replace(study.STUDIES["fast"], results=home))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    command = ["--study", "fast", "--smoke", "--device", "cpu", "--only", "fast recipe"]
    assert study.main(command) == 0 and home.is_file() and home.with_suffix(".md").is_file()
    assert not (tmp_path / "elsewhere" / "results").exists()
    assert study.main(command) == 0
    record = study.load_study(home)
    assert [r["variant"] for r in record["rows"]] == ["fast recipe"] and len(record["reruns"]) == 1
    assert record["command"] == "python -m helpers.study --study fast"
