"""Readers, the lesion-grouped split, image loading and the tf.data pipeline."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
from ml_helpers import REAL_DATA

from ml import augment as A
from ml import data as D
from ml.model import CLASS_NAMES
from ml.synthetic import make_ham10000_like, synthetic_image

# ------------------------------------------------------------------------------------ readers


def test_ham10000_reader_returns_the_sample_table(synthetic_ham):
    table = D.read_ham10000(synthetic_ham)
    meta = pd.read_csv(synthetic_ham / "HAM10000_metadata.csv")
    assert list(table.columns) == D.COLUMNS
    assert len(table) == len(meta)
    assert set(table["dx"]) == set(CLASS_NAMES)
    assert all(p.endswith(f"{i}.jpg") for i, p in zip(table["image_id"], table["path"]))


def test_read_dataset_recognises_the_ham10000_layout(synthetic_ham):
    assert len(D.read_dataset(synthetic_ham)) == len(D.read_ham10000(synthetic_ham))


def _copy_ham(synthetic_ham, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(synthetic_ham, target)
    return target


@pytest.mark.parametrize(
    "breakage, error, match",
    [
        ("no_folder", FileNotFoundError, "Dataset folder .* does not exist"),
        ("no_csv", FileNotFoundError, "Metadata file .* does not exist"),
        ("missing_image", FileNotFoundError, r"1 image\(s\) listed in the metadata were not found"),
        ("unknown_label", ValueError, r"Unknown label\(s\) \['melanoma'\]"),
        ("missing_column", ValueError, r"lacks the column\(s\) \['dx'\]"),
        ("duplicate", ValueError, "is listed more than once"),
    ],
)
def test_ham10000_reader_errors(synthetic_ham, tmp_path, breakage, error, match):
    root = _copy_ham(synthetic_ham, tmp_path)
    csv = root / "HAM10000_metadata.csv"
    meta = pd.read_csv(csv)
    if breakage == "no_folder":
        root = tmp_path / "nowhere"
    elif breakage == "no_csv":
        csv.unlink()
    elif breakage == "missing_image":
        (root / "images" / f"{meta['image_id'][0]}.jpg").unlink()
    elif breakage == "unknown_label":
        meta.loc[0, "dx"] = "melanoma"
        meta.to_csv(csv, index=False)
    elif breakage == "missing_column":
        meta.drop(columns="dx").to_csv(csv, index=False)
    elif breakage == "duplicate":
        pd.concat([meta, meta.head(1)]).to_csv(csv, index=False)
    with pytest.raises(error, match=match):
        D.read_ham10000(root)


def test_class_folder_reader(tmp_path):
    rng = np.random.default_rng(0)
    for dx in ("mel", "NV"):
        (tmp_path / dx).mkdir()
        for i in range(2):
            cv2.imwrite(str(tmp_path / dx / f"{dx}_{i}.jpg"), synthetic_image(dx.lower(), rng, (40, 50)))
    (tmp_path / "mel" / "notes.txt").write_text("ignored")
    table = D.read_dataset(tmp_path)
    assert sorted(table["dx"]) == ["mel", "mel", "nv", "nv"]
    assert (table["lesion_id"] == table["image_id"]).all()


def test_class_folder_reader_rejects_unknown_folders(tmp_path):
    (tmp_path / "freckle").mkdir()
    with pytest.raises(ValueError, match="Folder .*freckle.* is not named after a known class"):
        D.read_class_folders(tmp_path)


def _isic2019(tmp_path, labels):
    columns = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    rows, rng = [], np.random.default_rng(0)
    for i, label in enumerate(labels):
        image = f"ISIC_{i:07d}"
        cv2.imwrite(str(tmp_path / f"{image}.jpg"), synthetic_image("nv", rng, (40, 50)))
        rows.append({"image": image, **{c: float(c == label) for c in columns}})
    csv = tmp_path / "ISIC_2019_Training_GroundTruth.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def test_isic2019_reader_maps_ak_to_akiec(tmp_path):
    table = D.read_isic2019(_isic2019(tmp_path, ["AK", "MEL", "VASC"]))
    assert list(table["dx"]) == ["akiec", "mel", "vasc"]
    assert table.attrs["skipped"] == {}


def test_isic2019_reader_rejects_or_skips_classes_outside_the_model(tmp_path):
    csv = _isic2019(tmp_path, ["SCC", "NV", "UNK", "SCC"])
    with pytest.raises(ValueError, match=r"\{'SCC': 2, 'UNK': 1\} images of classes the seven-class model lacks"):
        D.read_isic2019(csv)
    table = D.read_isic2019(csv, unmapped="skip")
    assert list(table["dx"]) == ["nv"]
    assert table.attrs["skipped"] == {"SCC": 2, "UNK": 1}


def test_isic2019_reader_rejects_rows_that_are_not_one_hot(tmp_path):
    csv = _isic2019(tmp_path, ["NV"])
    gt = pd.read_csv(csv)
    gt.loc[0, "MEL"] = 1.0
    gt.to_csv(csv, index=False)
    with pytest.raises(ValueError, match="is not one-hot"):
        D.read_isic2019(csv)


# ------------------------------------------------------------------------------------ split


def _assert_grouped(table):
    splits_per_lesion = table.groupby("lesion_id")["split"].nunique()
    assert (splits_per_lesion == 1).all(), "a lesion_id crosses splits"


def test_split_keeps_lesions_together_and_every_class_in_every_split(synthetic_ham):
    table = D.split_by_lesion(D.read_ham10000(synthetic_ham), seed=3)
    _assert_grouped(table)
    for name in D.SPLITS:
        assert set(table["dx"][table["split"] == name]) == set(CLASS_NAMES)


def test_split_is_deterministic_for_a_seed(synthetic_ham):
    table = D.read_ham10000(synthetic_ham)
    a, b, c = D.split_by_lesion(table, seed=1), D.split_by_lesion(table, seed=1), D.split_by_lesion(table, seed=2)
    assert (a["split"] == b["split"]).all()
    assert not (a["split"] == c["split"]).all()


def test_split_roundtrips_through_split_csv(synthetic_ham, tmp_path):
    table = D.split_by_lesion(D.read_ham10000(synthetic_ham))
    D.save_split(table, tmp_path / "split.csv")
    again = D.apply_split(D.read_ham10000(synthetic_ham), tmp_path / "split.csv")
    assert list(again["split"]) == list(table["split"])
    assert list(pd.read_csv(tmp_path / "split.csv").columns) == ["image_id", "lesion_id", "dx", "split"]


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (1.2, -0.1, -0.1), (0.7, 0.3)])
def test_split_rejects_bad_fractions(synthetic_ham, fractions):
    with pytest.raises(ValueError, match="three non-negative numbers summing to 1"):
        D.split_by_lesion(D.read_ham10000(synthetic_ham), fractions)


@pytest.mark.skipif(not (REAL_DATA / "HAM10000_metadata.csv").is_file(), reason="real HAM10000 metadata not present")
def test_split_of_the_real_metadata_is_grouped_and_near_70_15_15():
    meta = pd.read_csv(REAL_DATA / "HAM10000_metadata.csv", dtype=str)
    table = D.split_by_lesion(meta[["image_id", "lesion_id", "dx"]], seed=42)
    _assert_grouped(table)
    shares = table.groupby("split")["lesion_id"].nunique() / table["lesion_id"].nunique()
    assert shares["train"] == pytest.approx(0.70, abs=0.02)
    assert shares["val"] == pytest.approx(0.15, abs=0.02)
    for name in D.SPLITS:
        assert set(table["dx"][table["split"] == name]) == set(CLASS_NAMES)


# ------------------------------------------------------------------------------------ images


def test_load_images_decodes_and_resizes(synthetic_ham):
    table = D.read_ham10000(synthetic_ham).head(5)
    images = D.load_images(table["path"], (32, 48))
    assert images.shape == (5, 32, 48, 3) and images.dtype == np.uint8
    direct = D.resize_image(D.decode_image_file(table["path"][0]), (32, 48))
    np.testing.assert_array_equal(images[0], direct)


def test_an_undecodable_image_is_named_in_the_error(tmp_path):
    bad = tmp_path / "ISIC_0000001.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match=r"ISIC_0000001.jpg' could not be decoded"):
        D.load_images([str(bad)], (32, 32))


def test_resize_keeps_4_to_3_and_rejects_bad_arrays():
    image = np.zeros((150, 200, 3), np.uint8)
    assert D.resize_image(image, (120, 160)).shape == (120, 160, 3)
    assert D.resize_image(image, (300, 400)).shape == (300, 400, 3)
    with pytest.raises(ValueError, match="Expected an HxWx3 uint8 RGB image"):
        D.resize_image(image.astype(np.float32), (32, 32))


def test_class_weights_balance_the_classes():
    labels = np.array([0] * 80 + [1] * 15 + [2] * 5)
    full = D.class_weights(labels, num_classes=4, power=1.0)
    assert full[3] == 0.0
    per_class_mass = np.bincount(labels, weights=full[labels])
    np.testing.assert_allclose(per_class_mass, per_class_mass[0], rtol=1e-5)
    assert np.mean(full[labels]) == pytest.approx(1.0)
    gentle = D.class_weights(labels, num_classes=4, power=0.5)
    assert gentle[2] / gentle[0] == pytest.approx(np.sqrt(full[2] / full[0]), rel=1e-5)


def test_evaluation_batches_are_unaugmented_and_ordered():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(10) % 7
    batches = A.ImageBatches(images, labels, batch_size=4, out_size=(32, 32), recipe=A.AugmentRecipe())
    x, y = zip(*[batches[i] for i in range(len(batches))])
    x, y = np.concatenate(x), np.concatenate(y)
    assert len(batches) == 3 and x.dtype == np.float32 and y.shape == (10, 7)
    np.testing.assert_array_equal(x, images.astype(np.float32))
    np.testing.assert_array_equal(y.argmax(1), labels)


def test_training_batches_are_cropped_to_the_input_size_and_stay_in_pixel_range():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 40, 40, 3), dtype=np.uint8)
    batches = A.ImageBatches(images, np.zeros(8, int), 8, (32, 32), training=True, recipe=A.AugmentRecipe())
    x, y = batches[0]
    assert x.shape == (8, 32, 32, 3) and y.shape == (8, 7)
    assert x.min() >= 0.0 and x.max() <= 255.0
    resized = A.ImageBatches(images, np.zeros(8, int), 8, (32, 32))[0][0]
    assert not np.allclose(x, resized)


def test_a_dataset_started_at_an_epoch_draws_what_an_uninterrupted_one_draws_there():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (12, 40, 40, 3), dtype=np.uint8)
    labels = np.arange(12) % 7
    uninterrupted = A.ImageBatches(images, labels, 4, (32, 32), training=True, recipe=A.AugmentRecipe())
    first_epoch = uninterrupted[0]
    for _ in range(3):
        uninterrupted.on_epoch_end()
    resumed = A.ImageBatches(images, labels, 4, (32, 32), training=True, recipe=A.AugmentRecipe())
    resumed.start_at(3)
    for index in range(len(resumed)):
        for ours, theirs in zip(resumed[index], uninterrupted[index]):
            np.testing.assert_array_equal(ours, theirs)
    assert not np.array_equal(resumed[0][0], first_epoch[0])


def test_no_augmentation_is_the_identity_besides_the_resize():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    batches = A.ImageBatches(images, np.arange(4), 4, (32, 32), training=True, recipe=A.NO_AUGMENTATION)
    x, y = batches[0]
    order = y.argmax(1)  # shuffled, but each image unchanged
    np.testing.assert_array_equal(x, images[order].astype(np.float32))


def test_a_turned_crop_keeps_the_output_aspect():
    image = np.zeros((150, 200, 3), np.uint8)
    image[:, :100] = 255  # left half white: a 90-degree turn moves the edge to horizontal
    recipe = A.AugmentRecipe(rot90_probability=1.0, aspect_jitter=0.0, crop_scale=(0.5, 0.5))
    crop = A.random_resized_crop(image, (120, 160), np.random.default_rng(0), recipe)
    assert crop.shape == (120, 160, 3)
    rows_vary = np.ptp(crop.mean(axis=(1, 2))) > 100
    columns_vary = np.ptp(crop.mean(axis=(0, 2))) > 100
    assert rows_vary and not columns_vary


def test_mixup_mixes_labels_with_the_same_weight_as_the_images():
    rng = np.random.default_rng(3)
    x = np.stack([np.full((2, 2, 3), v, np.float32) for v in (0.0, 100.0)])
    y = np.eye(7, dtype=np.float32)[[0, 1]]
    mixed_x, mixed_y = A.mixup(x, y, rng, A.AugmentRecipe(mixup_probability=1.0))
    np.testing.assert_allclose(mixed_y.sum(1), 1.0, rtol=1e-6)
    lam = mixed_y[0, 0]
    assert 0.5 <= lam < 1.0
    np.testing.assert_allclose(mixed_x[0], lam * x[0] + (1 - lam) * x[1], rtol=1e-5)


def test_balanced_sampling_draws_classes_equally():
    labels = np.array([0] * 90 + [1] * 10)
    images = np.zeros((100, 32, 32, 3), np.uint8)
    batches = A.ImageBatches(images, labels, 50, (32, 32), training=True, balance="sampling")
    drawn = []
    for _ in range(4):
        drawn += [batches[i][1].argmax(1) for i in range(len(batches))]
        batches.on_epoch_end()
    assert 0.4 < np.concatenate(drawn).mean() < 0.6


def test_fingerprint_depends_on_ids_and_labels_not_order(synthetic_ham):
    table = D.read_ham10000(synthetic_ham)
    fp = D.data_fingerprint(table)
    assert fp.startswith("sha256:") and fp == D.data_fingerprint(table.iloc[::-1])
    changed = table.copy()
    changed.loc[0, "dx"] = "vasc" if changed.loc[0, "dx"] != "vasc" else "nv"
    assert D.data_fingerprint(changed) != fp


def test_synthetic_dataset_sizes(tmp_path):
    root = make_ham10000_like(tmp_path / "d", lesions_per_class={"mel": 2, "nv": 1}, max_images_per_lesion=1)
    assert sorted(D.read_dataset(root)["dx"]) == ["mel", "mel", "nv"]


def test_the_mild_recipe_never_turns_an_image_and_never_mixes():
    image = np.zeros((150, 200, 3), np.uint8)
    image[:, :100] = 255  # a vertical edge: a 90-degree turn would make it horizontal
    rng = np.random.default_rng(0)
    mild = A.RECIPES["mild"]
    for _ in range(20):
        crop = A.random_resized_crop(image, (120, 160), rng, mild)
        assert np.ptp(crop.mean(axis=(0, 2))) > 100 and np.ptp(crop.mean(axis=(1, 2))) < 1
    x = np.stack([np.full((2, 2, 3), v, np.float32) for v in (0.0, 100.0)])
    y = np.eye(7, dtype=np.float32)[[0, 1]]
    mixed_x, mixed_y = A.mixup(x, y, rng, mild)
    np.testing.assert_array_equal(mixed_x, x)
    np.testing.assert_array_equal(mixed_y, y)
