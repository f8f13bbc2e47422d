"""Evaluation: `python -m ml.evaluate --model RUN_OR_ARTIFACT --data DIR --out DIR [--split test|all] [--tta]`.

Writes `DIR/metrics.json`, `DIR/predictions.csv`, `DIR/report.md` and PNG figures. With
`--split test` (the default) and a model folder that has split.csv, only the dataset's images in
that split's test part are used; `--split all` evaluates every image (an external dataset).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from ml import data as D
from ml import metrics as M
from ml import report as R
from ml.calibration import apply_temperature
from ml.predictor import Predictor

log = logging.getLogger("ml.evaluate")
SPLIT_CHOICES = ("test", "val", "train", "all")
MELANOMA_SPECIFICITY = 0.8


def select_images(table: pd.DataFrame, model_dir: Path, split: str) -> tuple[pd.DataFrame, int]:
    """The rows to evaluate, and how many of them the model was trained on (leakage count).

    Raises:
        ValueError: for an unknown split, or when the split keeps none of the dataset's images.
    """
    if split not in SPLIT_CHOICES:
        raise ValueError(f"Split must be one of {SPLIT_CHOICES}, got {split!r}.")
    split_csv = model_dir / "split.csv"
    if not split_csv.is_file():
        if split != "all":
            log.warning("%s has no split.csv: evaluating all %d images as an external set", model_dir, len(table))
        return table, 0
    recorded = pd.read_csv(split_csv, dtype=str)
    trained_on = set(recorded["image_id"][recorded["split"] == "train"])
    if split == "all":
        return table, int(table["image_id"].isin(trained_on).sum())
    wanted = set(recorded["image_id"][recorded["split"] == split])
    selected = table[table["image_id"].isin(wanted)]
    if selected.empty:
        raise ValueError(
            f"None of the dataset's {len(table)} images are in the model's {split!r} split; "
            "use --split all to evaluate an external dataset."
        )
    if len(selected) < len(wanted):
        log.info("%d of the %d %s images of the split are in this dataset", len(selected), len(wanted), split)
    return selected, 0


def compute_metrics(
    y: np.ndarray,
    probs_raw: np.ndarray,
    probs: np.ndarray,
    groups: ArrayLike | None,
    thresholds: dict,
    class_names: Sequence[str],
    malignant_classes: Sequence[str],
    n_boot: int,
    seed: int = 0,
    decide: Callable[[np.ndarray], np.ndarray] = M.argmax_decision,
) -> dict:
    """Every number of metrics.json from labels, uncalibrated and calibrated probabilities.

    Counts (accuracy, recall, confusion matrix) are of `decide`, the decision users see.
    """
    m = M.classification_metrics(y, probs, class_names, decide=decide)
    m["ece"] = M.expected_calibration_error(y, probs)
    m["ece_uncalibrated"] = M.expected_calibration_error(y, probs_raw)
    m["nll_uncalibrated"] = M.negative_log_likelihood(y, probs_raw)
    m["balanced_accuracy_ci"] = M.bootstrap_ci(M.balanced_accuracy_statistic(decide), y, probs, groups, n_boot, seed)
    m["macro_auc_ci"] = M.bootstrap_ci(M.macro_auc, y, probs, groups, n_boot, seed)
    mel = list(class_names).index("mel")
    is_mel = y == mel
    m["melanoma"] = {
        "recall_at_decision": m["per_class"]["mel"]["recall"] if "mel" in m["per_class"] else None,
        "recall_at_decision_ci": M.bootstrap_ci(M.recall_statistic(mel, decide), y, probs, groups, n_boot, seed),
        "roc_auc": M.binary_auc(is_mel, probs[:, mel]),
        "sensitivity_at_80_specificity": M.sensitivity_at_specificity(is_mel, probs[:, mel], MELANOMA_SPECIFICITY),
        "sensitivity_at_80_specificity_ci": M.bootstrap_ci(
            M.melanoma_sensitivity_statistic(MELANOMA_SPECIFICITY, class_names), y, probs, groups, n_boot, seed
        ),
        "at_threshold": M.binary_at_threshold(is_mel, probs[:, mel], thresholds.get("melanoma", 0.5)),
    }
    malignant_idx = [list(class_names).index(c) for c in malignant_classes]
    is_malignant = np.isin(y, malignant_idx)
    p_malignant = M.malignancy_score(probs, class_names, malignant_classes)
    m["malignant"] = {
        "classes": list(malignant_classes),
        "roc_auc": M.binary_auc(is_malignant, p_malignant),
        "pr_auc": M.binary_average_precision(is_malignant, p_malignant),
        "at_threshold": M.binary_at_threshold(is_malignant, p_malignant, thresholds.get("malignant", 0.5)),
    }
    # Flattened copies for readers that want one level (dashboards, the manifest summary).
    m["malignant"]["sensitivity"] = m["malignant"]["at_threshold"]["sensitivity"]
    m["malignant"]["specificity"] = m["malignant"]["at_threshold"]["specificity"]
    m["reliability"] = {"calibrated": M.reliability_bins(y, probs), "uncalibrated": M.reliability_bins(y, probs_raw)}
    return m


def evaluate(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    split: str = "test",
    tta: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
    predictor: Predictor | None = None,
) -> dict:
    """Evaluates a model folder on a dataset and writes metrics.json, predictions.csv and report.md.

    Args:
        model_dir: artifact or finished run folder.
        data: dataset path (any layout `ml.data.read_dataset` reads).
        out_dir: folder for the outputs (created).
        split: "test", "val", "train" (of the model's split.csv) or "all".
        tta: average the predictions over flips.
        n_boot: bootstrap replicates for the confidence intervals (0 to skip).
        seed: bootstrap seed.
        batch_size: images per forward pass.
        predictor: an already loaded Predictor of `model_dir` (saves rebuilding the model).

    Returns:
        The metrics dict (as written to metrics.json).

    Raises:
        FileNotFoundError, ValueError: for a missing model, bad data, or an empty selection.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    predictor = predictor or Predictor.load(model_dir, batch_size=batch_size)
    table, leaked = select_images(D.read_dataset(data), model_dir, split)
    class_names = predictor.class_names
    out_dir.mkdir(parents=True, exist_ok=True)
    images = D.load_images(table["path"], predictor.input_size).astype(np.float32)
    probs_raw = predictor.predict_raw(images, tta=tta)
    probs = apply_temperature(probs_raw, predictor.temperature)
    y = np.asarray([class_names.index(dx) for dx in table["dx"]])
    manifest = predictor.manifest
    metrics = compute_metrics(
        y,
        probs_raw,
        probs,
        table["lesion_id"].to_numpy(),
        manifest.get("thresholds") or {},
        class_names,
        manifest["malignant_classes"],
        n_boot,
        seed,
        decide=predictor.decision.choose,
    )
    metrics.update(
        model={"name": manifest["name"], "version": manifest["version"], "folder": str(model_dir)},
        data=str(data),
        split=split,
        tta=tta,
        temperature=predictor.temperature,
        decision=predictor.decision.to_manifest(),
        lesions=int(table["lesion_id"].nunique()),
        images_seen_in_training=leaked,
    )
    _write_predictions(out_dir / "predictions.csv", table, probs, predictor.decision.choose(probs), class_names)
    figures = _write_figures(out_dir, y, probs_raw, probs, metrics, class_names)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    R.write_report(out_dir, metrics, figures, class_names)
    log.info(
        "%s: balanced accuracy %.3f, macro AUC %s, ECE %.3f -> %s",
        split,
        metrics["balanced_accuracy"],
        metrics["macro_auc"],
        metrics["ece"],
        out_dir,
    )
    return metrics


def agreement(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    reference_data: str | os.PathLike,
    out_dir: str | os.PathLike,
    predictor: Predictor | None = None,
) -> dict:
    """How often the model's top class on the images of `data` (e.g. full resolution) is its top class on
    the same image ids in `reference_data` (e.g. the 200x150 copies); writes `out_dir/agreement.json`.

    Raises:
        ValueError: when the two datasets share no image id.
    """
    predictor = predictor or Predictor.load(model_dir)
    table = D.read_dataset(data)
    reference = D.read_dataset(reference_data).set_index("image_id")
    table = table[table["image_id"].isin(reference.index)]
    if table.empty:
        raise ValueError(f"{data} and {reference_data} share no image id.")
    y = np.asarray([predictor.class_names.index(dx) for dx in table["dx"]])
    probs, chosen = {}, {}
    for name, paths in (("fullres", table["path"]), ("reference", reference.loc[table["image_id"], "path"])):
        images = [D.decode_image_file(p) for p in paths]  # the Predictor resizes, as it does for uploads
        probs[name] = predictor.predict(images)
        chosen[name] = predictor.decision.choose(probs[name])
    agree = int((chosen["fullres"] == chosen["reference"]).sum())
    result = {
        "n": len(table),
        "agree": agree,
        "agreement": agree / len(table),
        "max_probability_difference": float(np.abs(probs["fullres"] - probs["reference"]).max()),
        "balanced_accuracy_fullres": M.balanced_accuracy(y, chosen["fullres"]),
        "balanced_accuracy_200x150": M.balanced_accuracy(y, chosen["reference"]),
        "data": str(data),
        "reference_data": str(reference_data),
        "model": {"name": predictor.manifest["name"], "version": predictor.manifest["version"]},
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "agreement.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _write_predictions(path: Path, table: pd.DataFrame, probs: np.ndarray, chosen: np.ndarray, class_names) -> None:
    out = table[["image_id", "lesion_id", "dx"]].reset_index(drop=True).copy()
    out["predicted"] = [class_names[i] for i in chosen]
    for c, name in enumerate(class_names):
        out[f"p_{name}"] = probs[:, c]
    out.to_csv(path, index=False, float_format="%.6f")


def _write_figures(out_dir: Path, y, probs_raw, probs, metrics, class_names) -> dict:
    return {
        "Confusion matrix": R.plot_confusion_matrices(
            metrics["confusion_matrix"], class_names, out_dir / "confusion_matrix.png"
        ),
        "ROC curves": R.plot_roc_curves(y, probs, class_names, out_dir / "roc_curves.png"),
        "Reliability before and after calibration": R.plot_reliability(
            y, probs_raw, probs, out_dir / "reliability.png"
        ),
        "Confidence histogram": R.plot_confidence_histogram(probs_raw, probs, out_dir / "confidence_histogram.png"),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ml.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="artifact or run folder (has manifest.json)")
    parser.add_argument(
        "--data", required=True, help="dataset folder (HAM10000 layout, class folders) or ISIC 2019 CSV"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", choices=SPLIT_CHOICES, default="test")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation (flips)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (0 to skip)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--agreement-with",
        metavar="DIR",
        help="instead: agreement of the top class on --data with the same images in DIR",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.agreement_with:
        print(json.dumps(agreement(args.model, args.data, args.agreement_with, args.out)))
        return
    m = evaluate(args.model, args.data, args.out, args.split, args.tta, args.bootstrap, batch_size=args.batch_size)
    summary = {
        k: m[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece", "ece_uncalibrated")
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
