"""Metadata fusion: age, sex and anatomical site combined with the network's image embedding.

A small head (multinomial logistic regression on image features of the frozen EfficientNetB3 + CBAM
network, either its standardised 1536-d `avg_pool` embedding or its calibrated log-probabilities,
whichever validates better, plus a metadata vector) is fitted on the training split. Half of
its training rows have their metadata blanked, so a case without metadata still gets a sound
image-only answer. `dx_type` is never used: it says how the diagnosis was made and leaks the answer.

    python -m ml.fusion --model models/default --data ../shared/data/ham10000-200x150 [--write]

prints validation balanced accuracy with and without metadata; `--write` stores the head in the
artifact (`fusion.npz`, and `manifest["fusion"]` with its temperature and decision).

    python -m ml.fusion --model models/default --data ../shared/data/ham10000-200x150 --test

evaluates the stored head once on the artifact's test split (nothing is chosen there) and writes
`eval_test/fusion.json`: balanced accuracy with its lesion-bootstrap interval, melanoma recall and
macro AUC for the network alone, the head with metadata and the head without it.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from sklearn.linear_model import LogisticRegression

from ml import data as D
from ml import metrics as M
from ml.calibration import apply_temperature, calibrated_softmax, fit_temperature
from ml.decision import class_prior, fit_decision
from ml.metadata import FUSION_FILE, METADATA_FEATURES, MISSING_METADATA, FusionHead, MetadataHead, metadata_matrix
from ml.predictor import Predictor

log = logging.getLogger("ml.fusion")

DROP_FRACTION = 0.5


def fit_head(
    embeddings: ArrayLike, metadata: ArrayLike, labels: ArrayLike, num_classes: int, c: float = 0.05, seed: int = 42
) -> FusionHead:
    """Fits the head on training rows, each once as given and, for a random half, without metadata."""
    rng = np.random.default_rng(seed)
    embeddings = np.asarray(embeddings, np.float32)
    dropped = rng.random(len(labels)) < DROP_FRACTION
    meta = np.asarray(metadata, np.float32).copy()
    meta[dropped] = MISSING_METADATA
    mean, scale = embeddings.mean(0), embeddings.std(0) + 1e-6
    x = np.hstack([(embeddings - mean) / scale, meta])
    model = LogisticRegression(C=c, max_iter=2000)
    model.fit(x, labels)
    weights = np.zeros((x.shape[1], num_classes), np.float32)
    bias = np.full(num_classes, -30.0, np.float32)  # a class absent from training gets no probability
    weights[:, model.classes_] = model.coef_.T
    bias[model.classes_] = model.intercept_
    return FusionHead(mean.astype(np.float32), scale.astype(np.float32), weights, bias)


def _embeddings(predictor, paths) -> tuple[np.ndarray, np.ndarray]:
    images = D.load_images(paths, predictor.input_size).astype(np.float32)
    return predictor.embed_and_predict_raw(images)


def _evaluate(y, probs, prior) -> dict:
    decision, scores = fit_decision(y, probs, prior)
    return {"tau": decision.tau, "balanced_accuracy": scores[decision.tau], "balanced_accuracy_argmax": scores[0.0]}


def _split_with_metadata(model_dir: Path, data: str) -> pd.DataFrame:
    """The artifact's split of the dataset with each image's age, sex and localization."""
    table = D.apply_split(D.read_dataset(data), model_dir / "split.csv")
    meta_csv = pd.read_csv(Path(data) / D.HAM10000_METADATA, usecols=["image_id", "age", "sex", "localization"])
    return table.merge(meta_csv, on="image_id", how="left")


def _test_figures(y, probs, choose, lesions, class_names, n_boot: int) -> dict:
    mel = list(class_names).index("mel")
    return {
        "balanced_accuracy": M.bootstrap_ci(M.balanced_accuracy_statistic(choose), y, probs, lesions, n_boot),
        "melanoma_recall": M.bootstrap_ci(M.recall_statistic(mel, choose), y, probs, lesions, n_boot),
        "macro_auc": M.macro_auc(y, probs),
        "ece": M.expected_calibration_error(y, probs),
    }


def evaluate_on_test(model_dir: Path, data: str, n_boot: int = 1000) -> dict:
    """The stored head on the test split, with and without metadata, beside the network alone."""
    predictor = Predictor.load(model_dir)
    head = MetadataHead.from_artifact(model_dir, predictor.manifest)
    if head is None:
        raise ValueError(f"{model_dir} has no metadata head (run with --write first).")
    table = _split_with_metadata(model_dir, data)
    test = table[table["split"] == "test"]
    y, lesions = D.labels_to_indices(test["dx"]), test["lesion_id"].to_numpy()
    network = predictor.predict(D.load_images(test["path"], predictor.input_size))
    meta = metadata_matrix(test)
    blank = np.repeat(MISSING_METADATA[None], len(y), axis=0)
    runs = {
        "network_alone": (network, predictor.decision.choose),
        "with_metadata": (head.probabilities(network, meta), head.decision.choose),
        "head_without_metadata": (head.probabilities(network, blank), head.decision.choose),
    }
    names = predictor.class_names
    report = {name: _test_figures(y, p, choose, lesions, names, n_boot) for name, (p, choose) in runs.items()}
    report.update(images=int(len(y)), lesions=int(test["lesion_id"].nunique()))
    return report


def fit_for_artifact(model_dir: Path, data: str, write: bool = False) -> dict:
    """Fits the head on the artifact's training split and reports validation figures (see module doc)."""
    predictor = Predictor.load(model_dir)
    table = _split_with_metadata(model_dir, data)
    parts = {name: table[table["split"] == name] for name in ("train", "val")}
    y = {name: D.labels_to_indices(part["dx"]) for name, part in parts.items()}
    meta = {name: metadata_matrix(part) for name, part in parts.items()}
    emb, raw = {}, {}
    for name, part in parts.items():
        emb[name], raw[name] = _embeddings(predictor, part["path"])
    k = len(predictor.class_names)
    prior = class_prior(y["train"], k)
    # Two kinds of image features: the pooled embedding, or the network's own calibrated log-probabilities.
    features = {
        "embedding": emb,
        "log_probs": {
            n: np.log(np.clip(apply_temperature(r, predictor.temperature), 1e-7, 1.0)) for n, r in raw.items()
        },
    }
    best = None
    for kind, image in features.items():
        for c in (0.01, 0.1, 1.0):
            head = fit_head(image["train"], meta["train"], y["train"], k, c=c)
            logits = head.logits(image["val"], meta["val"])
            temperature = fit_temperature(y["val"], calibrated_softmax(logits))["temperature"]
            score = _evaluate(y["val"], calibrated_softmax(logits, temperature), prior)
            log.info(
                "%s, C=%s: validation balanced accuracy %.3f (tau %.2f)",
                kind,
                c,
                score["balanced_accuracy"],
                score["tau"],
            )
            if best is None or score["balanced_accuracy"] > best[3]["balanced_accuracy"]:
                best = (kind, c, head, score, temperature)
    kind, c, head, with_meta, temperature = best
    image_val = features[kind]["val"]
    no_meta = np.repeat(MISSING_METADATA[None], len(y["val"]), axis=0)
    without = _evaluate(y["val"], calibrated_softmax(head.logits(image_val, no_meta), temperature), prior)
    network = _evaluate(y["val"], apply_temperature(raw["val"], predictor.temperature), prior)
    decision, _ = fit_decision(y["val"], calibrated_softmax(head.logits(image_val, meta["val"]), temperature), prior)
    report = {
        "image_features": kind,
        "c": c,
        "temperature": temperature,
        "validation": {"with_metadata": with_meta, "head_without_metadata": without, "network_alone": network},
        "features": list(METADATA_FEATURES),
        "decision": decision.to_manifest(),
    }
    if write:
        head.save(model_dir / FUSION_FILE)
        manifest_path = model_dir / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["fusion"] = {"file": FUSION_FILE, **report}
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ml.fusion", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="artifact folder (manifest.json, split.csv)")
    parser.add_argument("--data", required=True, help="HAM10000 folder (its metadata CSV has age, sex, localization)")
    parser.add_argument("--write", action="store_true", help="store the head in the artifact")
    parser.add_argument("--test", action="store_true", help="evaluate the stored head on the test split, once")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.test:
        report = evaluate_on_test(Path(args.model), args.data)
        out = Path(args.model) / "eval_test" / "fusion.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report, indent=1))
        return
    print(json.dumps(fit_for_artifact(Path(args.model), args.data, args.write)["validation"], indent=1))


if __name__ == "__main__":
    main()
