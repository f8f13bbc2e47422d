"""Metadata fusion: age, sex and anatomical site combined with the network's image embedding.

A small head (multinomial logistic regression on image features of the frozen EfficientNetB3 + CBAM
network, either its standardised 1536-d `avg_pool` embedding or its calibrated log-probabilities,
whichever validates better, plus a metadata vector) is fitted on the training split. Half of
its training rows have their metadata blanked, so a case without metadata still gets a sound
image-only answer. `dx_type` is never used: it says how the diagnosis was made and leaks the answer.

    python -m ml.fusion --model models/default --data ../shared/data/ham10000-200x150 [--write]

prints validation balanced accuracy with and without metadata; `--write` stores the head in the
artifact (`fusion.npz`, and `manifest["fusion"]` with its temperature and decision).
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
from ml.calibration import apply_temperature, calibrated_softmax, fit_temperature
from ml.decision import class_prior, fit_decision
from ml.metadata import FUSION_FILE, METADATA_FEATURES, MISSING_METADATA, FusionHead, metadata_matrix
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


def fit_for_artifact(model_dir: Path, data: str, write: bool = False) -> dict:
    """Fits the head on the artifact's training split and reports validation figures (see module doc)."""
    predictor = Predictor.load(model_dir)
    table = D.apply_split(D.read_dataset(data), model_dir / "split.csv")
    meta_csv = pd.read_csv(Path(data) / D.HAM10000_METADATA, usecols=["image_id", "age", "sex", "localization"])
    table = table.merge(meta_csv, on="image_id", how="left")
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    print(json.dumps(fit_for_artifact(Path(args.model), args.data, args.write)["validation"], indent=1))


if __name__ == "__main__":
    main()
