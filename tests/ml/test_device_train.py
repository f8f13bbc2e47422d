"""scripts/device_train.py: what travels to a GPU machine and back is complete and within the limits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from ml import data as D

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("device_train", ROOT / "scripts" / "device_train.py")
device_train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(device_train)


def test_weights_travel_in_parts_under_the_limit_and_join_back(tmp_path, monkeypatch):
    monkeypatch.setattr(device_train, "PART_BYTES", 1000)
    source = tmp_path / "model.weights.h5"
    source.write_bytes(np.random.default_rng(0).integers(0, 256, 3500, dtype=np.uint8).tobytes())
    parts = device_train.split_file(source, tmp_path)
    assert len(parts) == 4 and all(p.stat().st_size <= 1000 for p in parts)
    joined = device_train.join_parts(tmp_path, "model.weights.h5", tmp_path / "joined.h5")
    assert joined.read_bytes() == source.read_bytes()


def test_the_image_pack_holds_the_runs_train_and_val_images_only(trained_run, synthetic_ham, tmp_path):
    info = device_train.pack_images(trained_run, str(synthetic_ham), tmp_path)
    split = pd.read_csv(trained_run / "split.csv")
    assert info["images"] == int(split["split"].isin(["train", "val"]).sum())
    folder = device_train.unpack_images(tmp_path / device_train.DATA_FILE, tmp_path / "ham")
    table = D.apply_split(D.read_dataset(folder), trained_run / "split.csv", absent_ok=("test",))
    assert set(table["split"]) == {"train", "val"} and len(table) == info["images"]
    image = D.decode_image_file(table["path"].iloc[0])
    assert image.ndim == 3 and image.dtype == np.uint8
