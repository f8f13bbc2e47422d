"""Datasets: readers for three folder layouts, the lesion-grouped split, image loading, class weights.

Every reader returns the same table, a `pandas.DataFrame` with the columns

    image_id   str   file stem, e.g. "ISIC_0024306"
    lesion_id  str   the lesion the image shows (several images may show one lesion)
    dx         str   one of `ml.model.CLASS_NAMES`
    path       str   absolute path of the image file

Images are decoded once with OpenCV, resized to the model's input size and kept in memory as
uint8 (8,915 HAM10000 images at 120x160 take about 0.5 GB). That is the "decode once, cache"
step: it happens before training so that a file that does not decode is reported by name, and so
that `Predictor` resizes uploads with exactly the same function (`resize_image`). Augmentation
(`ml.augment`) works on that cache, on training batches only.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from ml.model import CLASS_NAMES

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
HAM10000_METADATA = "HAM10000_metadata.csv"
# The Kaggle/Harvard Dataverse release splits the images over two folders; our copies use images/.
HAM10000_IMAGE_DIRS = ("images", "HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_images", ".")
ISIC2019_TO_HAM = {"MEL": "mel", "NV": "nv", "BCC": "bcc", "AK": "akiec", "BKL": "bkl", "DF": "df", "VASC": "vasc"}
# Classes of ISIC 2019 that HAM10000's seven-way model has no output for.
ISIC2019_UNMAPPED = ("SCC", "UNK")
SPLITS = ("train", "val", "test")
RESIZE_DESCRIPTION = (
    "rgb uint8 0-255, resized to input_size (no crop, the source is 4:3) with OpenCV "
    "INTER_AREA when shrinking and INTER_LINEAR when enlarging; normalisation inside the model"
)
COLUMNS = ["image_id", "lesion_id", "dx", "path"]


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def read_ham10000(root: str | os.PathLike, metadata_csv: str | os.PathLike | None = None) -> pd.DataFrame:
    """Reads a folder in the HAM10000 layout: a metadata CSV beside one or more image folders.

    Args:
        root: the dataset folder, holding `HAM10000_metadata.csv` and `images/` (or the original
            `HAM10000_images_part_1/`, `HAM10000_images_part_2/`, or the images themselves).
        metadata_csv: another metadata file with the columns image_id, lesion_id and dx.

    Returns:
        The sample table (image_id, lesion_id, dx, path), in the CSV's order.

    Raises:
        FileNotFoundError: if the folder, the CSV or any listed image is missing.
        ValueError: if the CSV lacks a column, repeats an image or names an unknown class.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Dataset folder {str(root)!r} does not exist.")
    csv_path = Path(metadata_csv) if metadata_csv else root / HAM10000_METADATA
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"Metadata file {str(csv_path)!r} does not exist; a HAM10000-layout folder needs "
            f"{HAM10000_METADATA} beside its images."
        )
    meta = pd.read_csv(csv_path, dtype=str)
    missing_columns = {"image_id", "lesion_id", "dx"} - set(meta.columns)
    if missing_columns:
        raise ValueError(f"Metadata file {str(csv_path)!r} lacks the column(s) {sorted(missing_columns)}.")
    meta = meta.dropna(subset=["image_id"])
    _check_unique_images(meta["image_id"], csv_path)
    meta["dx"] = meta["dx"].str.strip().str.lower()
    _check_known_labels(meta["dx"], csv_path)
    index = _index_image_files(root, HAM10000_IMAGE_DIRS)
    table = pd.DataFrame(
        {
            "image_id": meta["image_id"].str.strip(),
            "lesion_id": meta["lesion_id"].fillna(meta["image_id"]).str.strip(),
            "dx": meta["dx"],
        }
    )
    table["path"] = _resolve_paths(table["image_id"], index, root)
    return table.reset_index(drop=True)


def read_class_folders(root: str | os.PathLike) -> pd.DataFrame:
    """Reads a class-per-folder layout, `root/<class name>/<image>`.

    Such folders carry no lesion ids, so every image counts as its own lesion; a grouped split
    of them is then an ordinary stratified split.

    Args:
        root: folder whose sub-folders are named after `CLASS_NAMES` (case-insensitive).

    Returns:
        The sample table, sorted by class then file name.

    Raises:
        FileNotFoundError: if the folder does not exist or holds no images.
        ValueError: if a sub-folder is not a known class name.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Dataset folder {str(root)!r} does not exist.")
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        dx = folder.name.lower()
        if dx not in CLASS_NAMES:
            raise ValueError(
                f"Folder {str(folder)!r} is not named after a known class; expected one of {list(CLASS_NAMES)}."
            )
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_EXTENSIONS:
                rows.append((file.stem, file.stem, dx, str(file.resolve())))
    if not rows:
        raise FileNotFoundError(f"No images were found in the class folders of {str(root)!r}.")
    table = pd.DataFrame(rows, columns=COLUMNS)
    _check_unique_images(table["image_id"], root)
    return table


def read_isic2019(
    ground_truth_csv: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    metadata_csv: str | os.PathLike | None = None,
    unmapped: str = "error",
) -> pd.DataFrame:
    """Reads the ISIC 2019 training ground truth (one-hot columns MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK).

    AK becomes `akiec`. SCC (squamous cell carcinoma) and UNK have no output in the seven-class
    HAM10000 model: with `unmapped="error"` (the default) their presence is an error, with
    `unmapped="skip"` those rows are dropped and counted in `table.attrs["skipped"]`.

    Args:
        ground_truth_csv: `ISIC_2019_Training_GroundTruth.csv`.
        image_dir: folder of the images; defaults to `ISIC_2019_Training_Input/` beside the CSV,
            else the CSV's folder.
        metadata_csv: optional `ISIC_2019_Training_Metadata.csv`, whose `lesion_id` column groups
            images of one lesion; without it every image is its own lesion.
        unmapped: "error" or "skip", see above.

    Returns:
        The sample table; `table.attrs["skipped"]` maps SCC/UNK to the number of rows dropped.

    Raises:
        FileNotFoundError: for a missing CSV, image folder or image.
        ValueError: for a wrong `unmapped`, missing columns, rows that are not one-hot, or
            SCC/UNK rows when `unmapped="error"`.
    """
    if unmapped not in ("error", "skip"):
        raise ValueError(f"unmapped must be 'error' or 'skip', got {unmapped!r}.")
    csv_path = Path(ground_truth_csv)
    if not csv_path.is_file():
        raise FileNotFoundError(f"ISIC 2019 ground-truth file {str(csv_path)!r} does not exist.")
    gt = pd.read_csv(csv_path)
    needed = {"image", *ISIC2019_TO_HAM}
    if needed - set(gt.columns):
        raise ValueError(f"Ground-truth file {str(csv_path)!r} lacks the column(s) {sorted(needed - set(gt.columns))}.")
    label_columns = [c for c in (*ISIC2019_TO_HAM, *ISIC2019_UNMAPPED) if c in gt.columns]
    onehot = gt[label_columns].to_numpy(dtype=float)
    if not np.allclose(onehot.sum(axis=1), 1.0):
        bad = gt["image"][~np.isclose(onehot.sum(axis=1), 1.0)].iloc[0]
        raise ValueError(f"Row for image {bad!r} in {str(csv_path)!r} is not one-hot over {label_columns}.")
    labels = np.asarray(label_columns)[onehot.argmax(axis=1)]
    skipped = {c: int((labels == c).sum()) for c in ISIC2019_UNMAPPED if (labels == c).any()}
    if skipped and unmapped == "error":
        raise ValueError(
            f"Ground truth {str(csv_path)!r} has {skipped} images of classes the seven-class model lacks; "
            "pass unmapped='skip' to drop them."
        )
    keep = ~np.isin(labels, ISIC2019_UNMAPPED)
    table = pd.DataFrame(
        {"image_id": gt["image"].astype(str)[keep], "dx": [ISIC2019_TO_HAM[label] for label in labels[keep]]}
    )
    table["lesion_id"] = _isic2019_lesions(table["image_id"], metadata_csv)
    image_dir = Path(image_dir) if image_dir else _default_isic_image_dir(csv_path)
    index = _index_image_files(image_dir, (".",))
    table["path"] = _resolve_paths(table["image_id"], index, image_dir)
    table = table[COLUMNS].reset_index(drop=True)
    table.attrs["skipped"] = skipped
    if skipped:
        log.info("ISIC 2019: skipped %s images of classes outside the model.", skipped)
    return table


def read_dataset(path: str | os.PathLike, unmapped: str = "error") -> pd.DataFrame:
    """Reads any supported layout, recognising it from what the path holds.

    A folder with `HAM10000_metadata.csv` is HAM10000; a CSV file or a folder with
    `ISIC_2019_Training_GroundTruth.csv` is ISIC 2019; any other folder is class-per-folder.

    Args:
        path: dataset folder or ISIC 2019 ground-truth CSV.
        unmapped: passed to `read_isic2019`.

    Returns:
        The sample table.

    Raises:
        FileNotFoundError, ValueError: as the chosen reader.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return read_isic2019(path, unmapped=unmapped)
    if not path.is_dir():
        raise FileNotFoundError(f"Dataset path {str(path)!r} does not exist.")
    if (path / HAM10000_METADATA).is_file():
        return read_ham10000(path)
    isic_csv = path / "ISIC_2019_Training_GroundTruth.csv"
    if isic_csv.is_file():
        meta = path / "ISIC_2019_Training_Metadata.csv"
        return read_isic2019(isic_csv, metadata_csv=meta if meta.is_file() else None, unmapped=unmapped)
    return read_class_folders(path)


def _check_unique_images(image_ids: pd.Series, source) -> None:
    duplicated = image_ids[image_ids.duplicated()]
    if len(duplicated):
        raise ValueError(f"Image {duplicated.iloc[0]!r} is listed more than once in {str(source)!r}.")


def _check_known_labels(labels: pd.Series, source) -> None:
    unknown = sorted(set(labels.dropna()) - set(CLASS_NAMES))
    if unknown or labels.isna().any():
        shown = unknown or ["<empty>"]
        raise ValueError(f"Unknown label(s) {shown} in {str(source)!r}; expected one of {list(CLASS_NAMES)}.")


def _index_image_files(root: Path, subdirs) -> dict[str, str]:
    """Maps file stem -> path over the candidate image folders (first folder wins)."""
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {str(root)!r} does not exist.")
    index: dict[str, str] = {}
    for sub in subdirs:
        folder = root / sub
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() in IMAGE_EXTENSIONS and entry.is_file():
                index.setdefault(stem, os.path.abspath(entry.path))
    return index


def _resolve_paths(image_ids: pd.Series, index: dict[str, str], root: Path) -> list[str]:
    missing = [i for i in image_ids if i not in index]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in the metadata were not found under {str(root)!r}, "
            f"for example {missing[0]!r}."
        )
    return [index[i] for i in image_ids]


def _default_isic_image_dir(csv_path: Path) -> Path:
    candidate = csv_path.parent / "ISIC_2019_Training_Input"
    return candidate if candidate.is_dir() else csv_path.parent


def _isic2019_lesions(image_ids: pd.Series, metadata_csv) -> list[str]:
    if not metadata_csv:
        return list(image_ids)
    meta = pd.read_csv(metadata_csv, dtype=str)
    if "lesion_id" not in meta.columns or "image" not in meta.columns:
        raise ValueError(f"ISIC 2019 metadata {str(metadata_csv)!r} needs the columns image and lesion_id.")
    lesions = dict(zip(meta["image"], meta["lesion_id"]))
    # Images without a lesion id stand alone: grouping them with each other would be wrong.
    return [lesions.get(i) if isinstance(lesions.get(i), str) else i for i in image_ids]


# --------------------------------------------------------------------------------------------
# Lesion-grouped, class-stratified split
# --------------------------------------------------------------------------------------------


def split_by_lesion(
    table: pd.DataFrame, fractions: tuple[float, float, float] = (0.70, 0.15, 0.15), seed: int = 42
) -> pd.DataFrame:
    """Assigns every image to train/val/test so that no lesion crosses splits.

    Lesions (not images) are shuffled per class with a fixed seed and cut by `fractions`; a
    lesion's class is its most frequent image label. Each class with at least three lesions gets
    at least one lesion in every split.

    Args:
        table: the sample table from a reader.
        fractions: train, validation and test shares of the lesions of each class.
        seed: seed of the shuffle; the same table and seed always give the same split.

    Returns:
        A copy of `table` with a `split` column ("train", "val" or "test").

    Raises:
        ValueError: if the fractions are negative or do not sum to one.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"Split fractions must be three non-negative numbers summing to 1, got {fractions}.")
    lesion_dx = table.groupby("lesion_id")["dx"].agg(lambda s: s.value_counts().index[0])
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for dx in sorted(lesion_dx.unique()):
        lesions = np.sort(lesion_dx.index[lesion_dx == dx].to_numpy())
        rng.shuffle(lesions)
        n_val, n_test = _split_counts(len(lesions), fractions)
        for i, lesion in enumerate(lesions):
            assignment[lesion] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    out = table.copy()
    out["split"] = out["lesion_id"].map(assignment)
    return out


def _split_counts(n: int, fractions) -> tuple[int, int]:
    """Validation and test lesion counts for a class of n lesions."""
    n_val, n_test = round(n * fractions[1]), round(n * fractions[2])
    if n >= 3:
        # Rare classes (df, vasc) must appear in every split or their metrics are undefined.
        n_val = max(n_val, 1) if fractions[1] > 0 else 0
        n_test = max(n_test, 1) if fractions[2] > 0 else 0
    n_test = min(n_test, n - n_val)
    return n_val, n_test


def save_split(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Writes split.csv (image_id, lesion_id, dx, split)."""
    table[["image_id", "lesion_id", "dx", "split"]].to_csv(path, index=False)


def apply_split(table: pd.DataFrame, split_csv: str | os.PathLike, absent_ok: Sequence[str] = ()) -> pd.DataFrame:
    """Attaches the `split` column recorded in a run's split.csv to a freshly read table.

    Args:
        absent_ok: parts of the split whose images may be missing from the table (e.g. "test"
            on a machine that only trains); their rows are left out.

    Raises:
        FileNotFoundError: if split.csv is missing.
        ValueError: if an image of the split is not in the table or its label changed.
    """
    split_csv = Path(split_csv)
    if not split_csv.is_file():
        raise FileNotFoundError(f"Split file {str(split_csv)!r} does not exist.")
    split = pd.read_csv(split_csv, dtype=str)
    merged = split.merge(table, on="image_id", how="left", suffixes=("", "_data"))
    missing = merged["path"].isna()
    merged, missing = (
        merged[~(missing & merged["split"].isin(absent_ok))],
        missing[~(missing & merged["split"].isin(absent_ok))],
    )
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} image(s) of {str(split_csv)!r} are not in the dataset, "
            f"for example {merged['image_id'][missing].iloc[0]!r}."
        )
    changed = merged["dx"] != merged["dx_data"]
    if changed.any():
        raise ValueError(
            f"The label of image {merged['image_id'][changed].iloc[0]!r} differs between "
            f"{str(split_csv)!r} and the dataset."
        )
    return merged[[*COLUMNS, "split"]]


def split_summary(table: pd.DataFrame) -> dict:
    """Images, lesions and per-class image counts of each split, for the manifest."""
    summary = {}
    for name in SPLITS:
        part = table[table["split"] == name]
        summary[name] = {
            "images": int(len(part)),
            "lesions": int(part["lesion_id"].nunique()),
            "per_class": {c: int((part["dx"] == c).sum()) for c in CLASS_NAMES},
        }
    return summary


def data_fingerprint(table: pd.DataFrame) -> str:
    """sha256 over the sorted "image_id,dx" lines of a table (the training images)."""
    lines = sorted(f"{i},{d}" for i, d in zip(table["image_id"], table["dx"]))
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def labels_to_indices(labels: Sequence[str] | pd.Series) -> np.ndarray:
    """Class names -> integer indices into `CLASS_NAMES`."""
    lookup = {c: i for i, c in enumerate(CLASS_NAMES)}
    unknown = sorted(set(labels) - set(lookup))
    if unknown:
        raise ValueError(f"Unknown label(s) {unknown}; expected one of {list(CLASS_NAMES)}.")
    return np.asarray([lookup[label] for label in labels], dtype=np.int32)


# --------------------------------------------------------------------------------------------
# Decoding and resizing (shared with the Predictor)
# --------------------------------------------------------------------------------------------


def decode_image_file(path: str | os.PathLike) -> np.ndarray:
    """Decodes an image file into an HxWx3 uint8 RGB array (EXIF orientation applied).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file is not a decodable image.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image file {path!r} does not exist.")
    data = np.fromfile(path, dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise ValueError(f"Image file {path!r} could not be decoded; it is empty, truncated or not an image.")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes an HxWx3 uint8 RGB array to `size` (H, W), the one resize used everywhere.

    INTER_AREA averages the pixels a shrunk output pixel covers (no aliasing of hair and
    pigment network); for enlarging it would degrade to nearest neighbour, so bilinear is used.

    Raises:
        ValueError: if the array is not HxWx3 uint8.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"Expected an HxWx3 uint8 RGB image, got shape {image.shape} and dtype {image.dtype}.")
    h, w = int(size[0]), int(size[1])
    if image.shape[:2] == (h, w):
        return image
    shrinking = image.shape[0] >= h and image.shape[1] >= w
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=interpolation)


def load_images(
    paths: Sequence[str | os.PathLike] | pd.Series,
    size: tuple[int, int],
    workers: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Decodes and resizes image files into one (N, H, W, 3) uint8 array.

    Args:
        paths: image file paths.
        size: (H, W) of the output.
        workers: decoding threads (OpenCV releases the GIL); defaults to the CPU count.
        progress: show a tqdm bar.

    Returns:
        The images, in the order of `paths`.

    Raises:
        FileNotFoundError, ValueError: naming the first file that is missing or does not decode.
    """
    paths = list(paths)
    h, w = int(size[0]), int(size[1])
    out = np.empty((len(paths), h, w, 3), dtype=np.uint8)

    def load_one(i: int) -> None:
        out[i] = resize_image(decode_image_file(paths[i]), (h, w))

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = pool.map(load_one, range(len(paths)))
        if progress and len(paths) > 200:
            jobs = tqdm(jobs, total=len(paths), desc=f"Decoding images at {h}x{w}", unit="img", mininterval=2)
        for _ in jobs:
            pass
    return out


# --------------------------------------------------------------------------------------------
# Class balancing (augmentation and batches: ml.augment)
# --------------------------------------------------------------------------------------------


def class_weights(labels: np.ndarray, num_classes: int = len(CLASS_NAMES), power: float = 1.0) -> np.ndarray:
    """Per-class weights (n / (k * n_c)) ** power, scaled so that their mean over samples is 1.

    power=1 is scikit-learn's "balanced" weighting; power=0.5 is a gentler square-root version.
    Classes absent from `labels` get weight 0 (they contribute no loss anyway).

    Raises:
        ValueError: for empty labels or a negative power.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ValueError("Class weights need at least one label.")
    if power < 0:
        raise ValueError(f"Class-weight power must be non-negative, got {power}.")
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.zeros(num_classes)
    present = counts > 0
    weights[present] = (labels.size / (present.sum() * counts[present])) ** power
    weights /= (weights[labels]).mean()
    return weights.astype(np.float32)
