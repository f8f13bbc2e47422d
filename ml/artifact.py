"""The self-describing model folder: manifest.json + model.weights.h5 (see docs/model.md).

A training run folder is itself an artifact; `python -m ml.export` copies one into a shipping
folder, optionally storing the weights as float16 (half the size; loaded back into float32).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import h5py
import keras
import numpy as np

from ml.data import RESIZE_DESCRIPTION
from ml.model import CLASS_LONG_NAMES, CLASS_NAMES, MALIGNANT_CLASSES, ModelConfig, gradcam_layer_name

MANIFEST = "manifest.json"
WEIGHTS = "model.weights.h5"
MODEL_NAME = "efficientnetb3-cbam"
REQUIRED_KEYS = (
    "name",
    "version",
    "trained",
    "trained_on",
    "class_names",
    "class_long_names",
    "malignant_classes",
    "input_size",
    "preprocessing",
    "architecture",
    "gradcam_layer",
    "temperature",
    "data_fingerprint",
    "split",
    "metrics",
)


def build_manifest(
    config: ModelConfig,
    *,
    version: str,
    trained: bool,
    trained_on: str | None = None,
    temperature: float = 1.0,
    thresholds: dict | None = None,
    data_fingerprint: str | None = None,
    split: dict | None = None,
    metrics: dict | None = None,
    name: str | None = None,
    extra: dict | None = None,
) -> dict:
    """A manifest dict with every key docs/interfaces.md requires.

    Args:
        config: the `ml.model.ModelConfig` the weights belong to.
        version: e.g. "2026.11.0", or "untrained".
        trained: whether the weights were trained.
        trained_on, temperature, thresholds, data_fingerprint, split, metrics: see the doc.
        name: defaults to "efficientnetb3-cbam" (or "efficientnetb3" without CBAM).
        extra: further keys (e.g. calibration details, training summary).

    Returns:
        The manifest dict (JSON-serialisable).
    """
    manifest = {
        "name": name or (MODEL_NAME if config.cbam else "efficientnetb3"),
        "version": version,
        "trained": bool(trained),
        "trained_on": trained_on,
        "class_names": list(CLASS_NAMES),
        "class_long_names": dict(CLASS_LONG_NAMES),
        "malignant_classes": list(MALIGNANT_CLASSES),
        "input_size": [int(config.input_size[0]), int(config.input_size[1])],
        "preprocessing": RESIZE_DESCRIPTION,
        "architecture": {"backbone": "EfficientNetB3", **config.to_dict()},
        "gradcam_layer": gradcam_layer_name(config),
        "temperature": float(temperature),
        "thresholds": thresholds,
        "data_fingerprint": data_fingerprint,
        "split": split,
        "metrics": metrics,
    }
    if thresholds is None:
        manifest.pop("thresholds")
    manifest.update(extra or {})
    return manifest


def validate_manifest(manifest: dict, source: str = "manifest") -> None:
    """Checks the keys and the few values the Predictor relies on.

    Raises:
        ValueError: naming the first problem.
    """
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{source} lacks the required key(s) {missing}.")
    size = manifest["input_size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(int(s) >= 32 for s in size)):
        raise ValueError(f"{source} has an invalid input_size {size!r}; expected [H, W], each at least 32.")
    if len(manifest["class_names"]) < 2:
        raise ValueError(f"{source} lists fewer than two class names.")
    if not float(manifest["temperature"]) > 0:
        raise ValueError(f"{source} has a non-positive temperature {manifest['temperature']!r}.")
    if not isinstance(manifest["architecture"], dict):
        raise ValueError(f"{source} has no architecture object to rebuild the model from.")


def read_manifest(folder: str | os.PathLike) -> dict:
    """Reads and validates `folder/manifest.json`.

    Raises:
        FileNotFoundError: if the folder or the manifest is missing.
        ValueError: if the manifest is not valid JSON or lacks required keys.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise FileNotFoundError(f"Model folder {str(folder)!r} does not exist.")
    if not path.is_file():
        raise FileNotFoundError(f"Model folder {str(folder)!r} has no {MANIFEST}.")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON: {exc}.") from exc
    validate_manifest(manifest, str(path))
    return manifest


def write_manifest(folder: str | os.PathLike, manifest: dict) -> Path:
    """Writes manifest.json atomically (a reader never sees half a file)."""
    validate_manifest(manifest)
    path = Path(folder) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serialisable.")


# Keras 3 `save_weights` of a compiled model also stores the optimizer's moments (twice the
# model's size for Adam). Artifacts and best-epoch files keep only the model's own groups.
MODEL_WEIGHT_GROUPS = ("layers", "vars")


def save_model_weights(model: keras.Model, path: str | os.PathLike) -> Path:
    """Writes the model's weights (without optimizer state) atomically to a .weights.h5 file.

    A kill while writing leaves the previous file intact: the new one is renamed into place.
    """
    path = Path(path)
    tmp = path.with_name(path.name.replace(".weights.h5", "") + ".tmp.weights.h5")
    model.save_weights(tmp)
    compact = path.with_name(path.name.replace(".weights.h5", "") + ".compact.weights.h5")
    convert_weights_file(tmp, compact, dtype=None)
    tmp.unlink()
    os.replace(compact, path)
    return path


def load_model_weights(model: keras.Model, path: str | os.PathLike) -> None:
    """`model.load_weights` for compact files into a compiled model, without the warning.

    Keras warns that it skips the optimizer's variables when the file has none; that is the
    point of compact files (the optimizer's moments live in the checkpoint's optimizer.npz).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(path)


def convert_weights_file(source: str | os.PathLike, target: str | os.PathLike, dtype: str | None) -> None:
    """Copies the model groups of a Keras .weights.h5 file, casting float datasets to `dtype`.

    Optimizer state in the source is dropped.

    Args:
        source, target: weight file paths (may not be the same file).
        dtype: "float16" for shipping, "float32" to restore the loadable precision, None to keep.
    """
    with h5py.File(source, "r") as src, h5py.File(target, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value

        def copy(name, obj):
            if name.split("/")[0] not in MODEL_WEIGHT_GROUPS:
                return
            if isinstance(obj, h5py.Group):
                group = dst.require_group(name)
                for key, value in obj.attrs.items():
                    group.attrs[key] = value
            elif isinstance(obj, h5py.Dataset):
                data = obj[()]
                if dtype and np.issubdtype(np.asarray(data).dtype, np.floating):
                    data = np.asarray(data).astype(dtype)
                dst.create_dataset(name, data=data)
                for key, value in obj.attrs.items():
                    dst[name].attrs[key] = value

        src.visititems(copy)
        for group in MODEL_WEIGHT_GROUPS:  # empty groups (e.g. "vars") are part of the format
            dst.require_group(group)


def weights_dtype(path: str | os.PathLike) -> str:
    """The float dtype stored in a weights file ("float16", "float32", or "mixed")."""
    dtypes = set()
    with h5py.File(path, "r") as f:
        for group in MODEL_WEIGHT_GROUPS:
            if group in f:
                f[group].visititems(
                    lambda _, o: (
                        dtypes.add(str(o.dtype)) if isinstance(o, h5py.Dataset) and o.dtype.kind == "f" else None
                    )
                )
    return dtypes.pop() if len(dtypes) == 1 else "mixed"


def export_artifact(run_dir: str | os.PathLike, out_dir: str | os.PathLike, float16: bool = False) -> Path:
    """Copies a run's manifest, weights and split into a clean artifact folder.

    Raises:
        FileNotFoundError: if the run has no manifest or weights (training not finished).
        ValueError: if the output folder is the run folder.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    manifest = read_manifest(run_dir)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"Run folder {str(run_dir)!r} has no {WEIGHTS}; has training finished?")
    if out_dir.resolve() == run_dir.resolve():
        raise ValueError("The export folder must differ from the run folder.")
    out_dir.mkdir(parents=True, exist_ok=True)
    convert_weights_file(weights, out_dir / WEIGHTS, "float16" if float16 else None)
    for name in ("split.csv", "MODEL_CARD.md", "LICENSE-DATA.md"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out_dir / name)
    manifest["weights_dtype"] = "float16" if float16 else "float32"
    write_manifest(out_dir, manifest)
    return out_dir
