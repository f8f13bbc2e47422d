"""The train -> evaluate -> export command lines end to end, --resume, and checkpoint state."""

from __future__ import annotations

import json
from types import SimpleNamespace

import keras
import numpy as np
import pandas as pd
import pytest
from ml_helpers import TINY_SIZE, run_module

from ml.artifact import REQUIRED_KEYS, read_manifest
from ml.train import RunCheckpoints, parse_args, plan_stages

METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece", "ece_uncalibrated", "per_class")


def test_training_run_folder_is_a_complete_artifact(trained_run):
    for name in (
        "args.json",
        "versions.json",
        "split.csv",
        "history.csv",
        "train.log",
        "best.weights.h5",
        "model.weights.h5",
        "manifest.json",
        "calibration.json",
        "state.json",
    ):
        assert (trained_run / name).is_file(), name
    manifest = read_manifest(trained_run)
    assert set(REQUIRED_KEYS) <= set(manifest)
    assert manifest["trained"] is True and manifest["input_size"] == list(TINY_SIZE)
    assert manifest["data_fingerprint"].startswith("sha256:")
    assert set(manifest["thresholds"]) == {"malignant", "melanoma"}
    assert manifest["temperature"] > 0
    assert {"train", "val", "test"} <= set(manifest["split"])
    assert set(METRIC_KEYS[:5]) <= set(manifest["metrics"]["test"])
    args = json.loads((trained_run / "args.json").read_text())
    assert args["epochs"] == 1 and args["img_size"] == list(TINY_SIZE)
    assert "tensorflow" in json.loads((trained_run / "versions.json").read_text())
    history = pd.read_csv(trained_run / "history.csv")
    assert list(history["epoch"]) == [1]
    assert {"loss", "val_balanced_accuracy", "val_macro_auc", "lr"} <= set(history.columns)
    assert [p.name for p in (trained_run / "checkpoints").iterdir()] == ["epoch-0001"]
    assert "training from scratch in one stage" in (trained_run / "train.log").read_text()


def test_split_csv_has_no_lesion_in_two_splits(trained_run):
    split = pd.read_csv(trained_run / "split.csv")
    assert list(split.columns) == ["image_id", "lesion_id", "dx", "split"]
    assert (split.groupby("lesion_id")["split"].nunique() == 1).all()


def test_test_evaluation_at_the_end_of_training(trained_run):
    metrics = json.loads((trained_run / "eval_test" / "metrics.json").read_text())
    split = pd.read_csv(trained_run / "split.csv")
    assert metrics["n"] == int((split["split"] == "test").sum())
    assert set(METRIC_KEYS) <= set(metrics)
    assert {"precision", "recall", "f1", "support", "roc_auc", "pr_auc"} <= set(metrics["per_class"]["mel"])
    assert {"estimate", "low", "high"} <= set(metrics["melanoma"]["sensitivity_at_80_specificity_ci"])
    assert {"roc_auc", "sensitivity", "specificity"} <= set(metrics["malignant"])
    assert {"low", "high"} <= set(metrics["balanced_accuracy_ci"]) and {"low", "high"} <= set(metrics["macro_auc_ci"])


def test_evaluate_cli_with_tta_on_all_images(trained_run, synthetic_ham, tmp_path):
    out = tmp_path / "eval"
    proc = run_module(
        "ml.evaluate",
        "--model",
        str(trained_run),
        "--data",
        str(synthetic_ham),
        "--out",
        str(out),
        "--split",
        "all",
        "--tta",
        "--bootstrap",
        "10",
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["n"] == metrics["n"] == len(pd.read_csv(synthetic_ham / "HAM10000_metadata.csv"))
    assert metrics["tta"] is True and metrics["images_seen_in_training"] > 0
    for png in ("confusion_matrix.png", "roc_curves.png", "reliability.png", "confidence_histogram.png"):
        assert (out / png).stat().st_size > 1000
        assert f"]({png})" in (out / "report.md").read_text()
    assert len(pd.read_csv(out / "predictions.csv")) == metrics["n"]
    assert metrics["temperature"] == read_manifest(trained_run)["temperature"]  # the run folder loaded as an artifact


def test_export_cli_float16(trained_run, tmp_path):
    out = tmp_path / "shipped"
    run_module("ml.export", "--run", str(trained_run), "--out", str(out), "--float16")
    manifest = read_manifest(out)
    assert manifest["weights_dtype"] == "float16" and (out / "split.csv").is_file()
    assert manifest["temperature"] == read_manifest(trained_run)["temperature"]


@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint(trained_run, tmp_path):
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(trained_run, run)
    args = json.loads((run / "args.json").read_text())
    run_module(
        "ml.train",
        "--out",
        str(run),
        "--resume",
        "--epochs",
        "2",
        "--no-test-eval",
        "--verbose",
        "0",
        "--data",
        args["data"],
    )
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    state = json.loads((run / "checkpoints" / "epoch-0002" / "state.json").read_text())
    assert state["epoch"] == 2
    assert json.loads((run / "args.json").read_text())["epochs"] == 2
    assert "resuming run" in (run / "train.log").read_text()


@pytest.mark.slow
def test_a_resumed_run_draws_the_batches_of_its_epoch_not_epoch_0s_again(trained_run, tmp_path, monkeypatch):
    """Epoch 2 of a resumed run trains on the shuffle and augmentations of epoch 2 (index 1), as an
    uninterrupted run would, never on a replay of epoch 1's."""
    import shutil

    from ml import augment
    from ml.train import train

    drawn: list[int] = []  # the epoch of each training batch, in the order they are drawn
    original = augment.ImageBatches.__getitem__

    def recording(self, index):
        if self.training:
            drawn.append(self.epoch)
        return original(self, index)

    monkeypatch.setattr(augment.ImageBatches, "__getitem__", recording)
    run = tmp_path / "resumed"
    shutil.copytree(trained_run, run)
    data = json.loads((run / "args.json").read_text())["data"]
    train(
        parse_args(["--out", str(run), "--resume", "--epochs", "2", "--no-test-eval", "--verbose", "0", "--data", data])
    )
    # tf.data may fetch ahead into an epoch that never runs (2), never back into epoch 0's batches.
    assert drawn[0] == 1 and 0 not in drawn


def test_resume_from_the_compact_carry_over_alone(trained_run, tmp_path):
    """What a later session on a fresh machine has: resume/ (float16, committed), no checkpoints/."""
    import shutil

    from ml.artifact import weights_dtype

    run = tmp_path / "carried"
    shutil.copytree(trained_run, run)
    run_module("ml.train", "--out", str(run), "--pack-resume")
    assert weights_dtype(run / "resume" / "model.weights.h5") == "float16"
    shutil.rmtree(run / "checkpoints")
    (run / "best.weights.h5").unlink()
    args = json.loads((run / "args.json").read_text())
    run_module(
        "ml.train",
        "--out",
        str(run),
        "--resume",
        "--epochs",
        "2",
        "--no-test-eval",
        "--verbose",
        "0",
        "--data",
        args["data"],
    )
    assert list(pd.read_csv(run / "history.csv")["epoch"]) == [1, 2]
    assert "restored the float16 carry-over" in (run / "train.log").read_text()
    assert (run / "best.weights.h5").is_file()


def test_a_second_start_without_resume_is_refused(trained_run):
    from ml.train import train

    args = parse_args(["--data", "unused", "--out", str(trained_run), "--epochs", "1"])
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        train(args)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--out", "x"], "--data is required"),
        (["--data", "d", "--out", "x", "--epochs", "0"], "--epochs must be at least 1"),
        (["--data", "d", "--out", "x", "--img-size", "16", "16"], "--img-size must be at least 32 32"),
        (["--data", "d", "--out", "x", "--unfreeze-from-block", "9"], "--unfreeze-from-block must be between 1 and 7"),
    ],
)
def test_bad_arguments(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_args(argv)


def test_resume_without_a_run_and_changed_settings_are_refused(trained_run, tmp_path):
    with pytest.raises(ValueError, match="--resume was given but .* does not exist"):
        parse_args(["--out", str(tmp_path / "none"), "--resume"])
    with pytest.raises(ValueError, match="--img-size .* differs from the run's"):
        parse_args(["--out", str(trained_run), "--resume", "--img-size", "64", "64"])


def test_stages_one_from_scratch_two_when_pretrained():
    base = dict(epochs=10, lr=1e-3, fine_tune_lr=1e-4, warmup_epochs=3)
    scratch = plan_stages(SimpleNamespace(weights="none", **base))
    assert [(s.name, s.end_epoch, s.trainable) for s in scratch] == [("scratch", 10, "all")]
    pretrained = plan_stages(SimpleNamespace(weights="imagenet", **base))
    assert [(s.name, s.end_epoch, s.lr, s.trainable) for s in pretrained] == [
        ("warmup", 3, 1e-3, "head"),
        ("finetune", 10, 1e-4, "top_blocks"),
    ]


def test_fine_tuning_keeps_batchnorm_frozen(tiny_predictor):
    from ml.train import set_trainable

    model = tiny_predictor.model
    try:
        set_trainable(model, "top_blocks", unfreeze_from_block=6)
        trainable = {layer.name for layer in model.layers if layer.trainable and layer.weights}
        assert "block6a_expand_conv" in trainable and "block5a_expand_conv" not in trainable
        assert "cbam_top_channel" in trainable and "predictions" in trainable
        assert not any(isinstance(model.get_layer(n), keras.layers.BatchNormalization) for n in trainable)
        set_trainable(model, "head")
        assert "block7a_expand_conv" not in {layer.name for layer in model.layers if layer.trainable and layer.weights}
    finally:
        set_trainable(model, "all")


def _tiny_model(seed=0, compiled=True):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(8)(inputs)))
    if compiled:
        _compile(model)
    return model


def _compile(model):
    model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss="categorical_crossentropy")


def test_checkpoint_restores_weights_and_optimizer_moments(tmp_path):
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = np.eye(3, dtype="float32")[np.arange(32) % 3]
    model = _tiny_model()
    model.fit(x, y, epochs=2, verbose=0)
    checkpoints = RunCheckpoints(tmp_path, keep=2)
    for epoch in (1, 2, 3):
        checkpoints.save(model, {"epoch": epoch, "best": 0.5})
    (tmp_path / "checkpoints" / "epoch-0004").mkdir()  # a kill during writing: no state.json
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-0002", "epoch-0003", "epoch-0004"]
    latest = checkpoints.latest()
    assert latest.name == "epoch-0003" and checkpoints.read_state(latest)["best"] == 0.5

    # The order train() uses: weights into the bare model, compile, then the optimizer's moments.
    restored = _tiny_model(seed=1, compiled=False)
    checkpoints.restore_model(restored, latest)
    _compile(restored)
    checkpoints.restore_optimizer(restored, latest)
    for a, b in zip(model.optimizer.variables, restored.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The next step from the restored state is the step the original would have taken.
    model.fit(x, y, epochs=1, verbose=0, shuffle=False)
    restored.fit(x, y, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.weights, restored.weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
