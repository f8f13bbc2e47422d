"""`python -m ml.explain` end to end on two small generated JPEGs with the untrained model."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml.explain import cli
from ml.explain.cli import main

SIZES = {"lesion_a": (60, 80), "lesion_b": (45, 70)}  # (height, width), neither the model's size


@pytest.fixture(scope="module")
def untrained():
    """`--model untrained` loaded once for the module, at the size UNTRAINED_INPUT_SIZE asks for."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNTRAINED_INPUT_SIZE", "32,48")
        predictor = cli.load_predictor("untrained")
    assert predictor.input_size == (32, 48) and predictor.manifest["trained"] is False
    return predictor


@pytest.fixture
def image_dir(tmp_path, monkeypatch, untrained):
    # Reuse the module's untrained model rather than building EfficientNet once per test.
    monkeypatch.setattr(cli, "load_predictor", lambda spec: untrained if spec == "untrained" else pytest.fail(spec))
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for name, (h, w) in SIZES.items():
        Image.fromarray(rng.randint(0, 256, (h, w, 3)).astype(np.uint8)).save(folder / f"{name}.jpg", quality=90)
    (folder / "notes.txt").write_text("not an image")
    return folder


def _check_outputs(out: Path, method: str) -> dict:
    for name, (h, w) in SIZES.items():
        values = np.load(out / f"{name}.npy")
        assert values.shape == (h, w) and values.dtype == np.float32
        if method == "gradcam":
            assert values.min() >= 0.0 and values.max() <= 1.0
        with Image.open(out / f"{name}.png") as picture:
            assert picture.size == (w, h) and picture.mode == "RGB"
    summary = json.loads((out / "summary.json").read_text())
    assert [row["image"] for row in summary["images"]] == ["lesion_a.jpg", "lesion_b.jpg"]
    return summary


def test_gradcam_plus_plus_for_a_chosen_class(image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", "untrained", "--images", str(image_dir), "--method", "gradcam", "--out", str(out)]
    assert main(args + ["--plus-plus", "--class", "mel"]) == 0
    summary = _check_outputs(out, "gradcam")
    assert {row["explained_class"] for row in summary["images"]} == {"mel"}
    assert summary["plus_plus"] is True
    assert "lesion_a.jpg: gradcam for mel" in capsys.readouterr().out


def test_shap_for_the_top_class(image_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--model", "untrained", "--images", str(image_dir), "--method", "shap", "--out", str(out)]
    assert main(args + ["--max-evals", "20"]) == 0
    summary = _check_outputs(out, "shap")
    for row in summary["images"]:
        probs = row["probabilities"]
        assert row["explained_class"] == max(probs, key=probs.get)


def test_a_missing_image_folder_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "untrained", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_empty_image_folder_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", "untrained", "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "has no .jpg/.jpeg/.png files" in capsys.readouterr().err


def test_module_entry_point_runs_the_cli(tmp_path, monkeypatch, capsys):
    argv = ["python -m ml.explain", "--model", "untrained", "--images", str(tmp_path / "none"), "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("ml.explain", run_name="__main__")
    assert exit_info.value.code == 2
    assert "Image folder" in capsys.readouterr().err
