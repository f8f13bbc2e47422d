"""Out-of-distribution warning: is this image dermoscopy like the images the model was trained on?

The network gives every image a diagnosis, a building or a page of text included. The detector
scores an image from its pooled embedding and its pixels (so the prediction pass that stores the
embedding also scores it, with no further model call) with signals none of which separates well on
its own:

- the Mahalanobis distance to the nearest class of the training split, in a PCA space of the
  embedding (tied covariance);
- the energy of the classifier's logits (-logsumexp, recomputed from the embedding and the
  dense head's weights);
- the largest softmax probability;
- the length of the embedding;
- cheap statistics of the input image at the model's input size (`ml.image_stats`: colour,
  texture, flat area, distinct colours, centre against border), which the embedding of a network
  trained on dermoscopy alone hardly sees: a flat colour or a mask lands near some real lesions;

and (depending on the variant) the leading PCA coordinates themselves. A logistic regression on the
standardised signals is fitted with outlier exposure: training-split dermoscopy against generated
non-dermoscopic images of ml.outliers.TRAINING_KINDS only (the other kinds, and new draws of the
training kinds from another seed and the test split's masks, are kept for the measurement). The
threshold is the score above which at most 5 % of the validation split's dermoscopy images lie.
Which variant (how many coordinates, how much regularisation) is shipped is chosen by
`ml.ood_choice` without looking at the kind it is measured on (leave one kind out).

    python -m ml.ood --model models/default --data ../shared/data/ham10000-200x150 [--write]

fits it, reports AUROC and per-kind flag counts on the evaluation set and the share of flagged test
dermoscopy, and with --write stores it in the artifact (`ood.npz`, `manifest["ood"]`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from ml import image_stats

OOD_FILE = "ood.npz"
PCA_DIMS = 64
FALSE_FLAG_RATE = 0.05  # at most this share of the validation split's dermoscopy is flagged
TRAIN_SEED, EVAL_SEED = 1, 2
TRAIN_PER_KIND, EVAL_PER_KIND = 150, 60
EMBEDDING_SIGNALS = 4  # Mahalanobis distance, energy, max softmax, embedding norm
FIXED = EMBEDDING_SIGNALS + len(image_stats.NAMES)  # signal columns every variant uses


class Inputs(NamedTuple):
    """What the detector reads of N images: pooled embeddings (N, D) and `ml.image_stats.statistics`."""

    embeddings: np.ndarray
    statistics: np.ndarray


@dataclass(frozen=True)
class Variant:
    """What the regression sees and how strongly it is regularised."""

    coordinates: int  # leading PCA coordinates appended to the FIXED signals (0 to PCA_DIMS)
    regularisation: float  # inverse L2 strength (scikit-learn's C)

    def __str__(self) -> str:
        return f"{self.coordinates} coordinates, C = {self.regularisation:g}"


# The variant for an artifact that records none; `python -m ml.ood_choice --write` stores the one it
# chooses in the artifact's manifest, and a refit (`python -m ml.ood`) keeps it.
DEFAULT_VARIANT = Variant(coordinates=0, regularisation=0.01)


def artifact_variant(model_dir: Path) -> Variant:
    """The variant the artifact's detector was chosen with (DEFAULT_VARIANT when it records none)."""
    from ml.artifact import read_manifest

    recorded = read_manifest(model_dir).get("ood", {}).get("variant")
    return Variant(**recorded) if recorded else DEFAULT_VARIANT


@dataclass
class OodDetector:
    """The fitted detector (see the module doc); `score` is higher for less dermoscopy-like images."""

    mean: np.ndarray  # (D,) embedding mean
    components: np.ndarray  # (D, d) PCA axes
    class_means: np.ndarray  # (C, d) in PCA space
    precision: np.ndarray  # (d, d) inverse of the tied covariance
    head_kernel: np.ndarray  # (D, C) the classifier's dense layer
    head_bias: np.ndarray  # (C,)
    input_size: np.ndarray  # (H, W) the images' statistics are computed at (the model's input)
    signal_mean: np.ndarray  # (S,) standardisation of the signals (S = FIXED + the variant's coordinates)
    signal_scale: np.ndarray
    weights: np.ndarray  # (S,) logistic regression
    bias: float
    threshold: float

    def statistics(self, images: ArrayLike) -> np.ndarray:
        """`ml.image_stats.statistics` of RGB images of any size, at the model's input size."""
        return image_stats.statistics(images, tuple(int(s) for s in self.input_size))

    def signals(self, embeddings: ArrayLike, statistics: ArrayLike) -> np.ndarray:
        """(N, S): log Mahalanobis distance, energy, max softmax, log embedding norm, the image
        statistics, and the leading S - FIXED PCA coordinates themselves (where in embedding space
        the outliers lie)."""
        e = np.asarray(embeddings, np.float32)
        z = (e - self.mean) @ self.components
        diff = z[:, None, :] - self.class_means[None]
        maha = np.einsum("ncd,de,nce->nc", diff, self.precision, diff).min(axis=1)
        logits = e @ self.head_kernel + self.head_bias
        top = logits.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        msp = np.exp(top[:, 0] - lse)
        norm = np.log(np.linalg.norm(e, axis=1) + 1e-6)
        embedding = np.stack([np.log(maha + 1e-6), -lse, msp, norm], axis=1)
        return np.hstack([embedding, np.asarray(statistics, np.float32), z[:, : len(self.weights) - FIXED]])

    def score(self, embeddings: ArrayLike, images: ArrayLike) -> np.ndarray:
        """(N,) probability-like score in [0, 1] that each image is not dermoscopy, from the pooled
        embeddings (N, D) and the images themselves (N RGB uint8 arrays, any size)."""
        return self.score_signals(self.signals(embeddings, self.statistics(images)))

    def score_signals(self, signals: np.ndarray) -> np.ndarray:
        """`score` from already computed signals; columns beyond this variant's (all the PCA
        coordinates, as `fit_statistics` gives them) are ignored."""
        x = (signals[:, : len(self.weights)] - self.signal_mean) / self.signal_scale
        return 1.0 / (1.0 + np.exp(-(x @ self.weights + self.bias)))

    def flagged(self, scores: ArrayLike) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def save(self, path: str | Path) -> None:
        np.savez(path, **{k: np.asarray(v) for k, v in self.__dict__.items()})

    @classmethod
    def load(cls, path: str | Path) -> OodDetector:
        with np.load(path) as f:
            values = {k: f[k] for k in f.files}
        values["bias"], values["threshold"] = float(values["bias"]), float(values["threshold"])
        values["input_size"] = values["input_size"].astype(np.int64)
        return cls(
            **{
                k: (v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
                for k, v in values.items()
            }
        )

    @classmethod
    def from_artifact(cls, folder: str | Path, manifest: dict) -> OodDetector | None:
        """The artifact's detector, or None when it has none (analyses then carry no OOD verdict)."""
        info = manifest.get("ood")
        return cls.load(Path(folder) / info.get("file", OOD_FILE)) if info else None


def fit(
    train: Inputs,
    train_labels: ArrayLike,
    outliers: Inputs,
    val: Inputs,
    head: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    input_size: tuple[int, int],
    variant: Variant = DEFAULT_VARIANT,
) -> OodDetector:
    """Fits the signals' statistics on the training split, the regression with outlier exposure,
    and the threshold on the validation split's dermoscopy."""
    base = fit_statistics(train.embeddings, train_labels, head, num_classes, input_size)
    signals = [base.signals(*x) for x in (train, outliers, val)]
    return with_regression(base, *signals, variant)


def fit_statistics(
    train_embeddings: ArrayLike,
    train_labels: ArrayLike,
    head: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    input_size: tuple[int, int],
) -> OodDetector:
    """The signals' statistics from the training split; no regression yet (its `signals` are all
    FIXED + PCA_DIMS columns, which `with_regression` selects from)."""
    e = np.asarray(train_embeddings, np.float64)
    labels = np.asarray(train_labels)
    mean = e.mean(axis=0)
    _, _, vt = np.linalg.svd(e - mean, full_matrices=False)
    components = vt[:PCA_DIMS].T
    z = (e - mean) @ components
    class_means = np.stack(
        [z[labels == c].mean(axis=0) if (labels == c).any() else z.mean(axis=0) for c in range(num_classes)]
    )
    centred = z - class_means[labels]
    precision = np.linalg.inv(np.cov(centred, rowvar=False) + 1e-6 * np.eye(PCA_DIMS))
    columns = FIXED + PCA_DIMS
    detector = OodDetector(
        mean.astype(np.float32), components.astype(np.float32), class_means.astype(np.float32),
        precision.astype(np.float32), np.asarray(head[0], np.float32), np.asarray(head[1], np.float32),
        np.asarray(input_size, np.int64), np.zeros(columns, np.float32), np.ones(columns, np.float32),
        np.zeros(columns, np.float32), 0.0, 0.5,
    )  # fmt: skip
    return detector


def with_regression(
    base: OodDetector, real: np.ndarray, outliers: np.ndarray, val: np.ndarray, variant: Variant
) -> OodDetector:
    """`base` with the variant's regression, fitted on the `fit_statistics` signals of training
    dermoscopy (`real`) against `outliers`, and its threshold from the validation split (`val`)."""
    from sklearn.linear_model import LogisticRegression

    if not 0 <= variant.coordinates <= PCA_DIMS:
        raise ValueError(f"A variant uses 0 to {PCA_DIMS} PCA coordinates, got {variant.coordinates}.")
    columns = FIXED + variant.coordinates
    real, outliers = real[:, :columns], outliers[:, :columns]
    both = np.concatenate([real, outliers])
    mean, scale = both.mean(axis=0), both.std(axis=0) + 1e-6
    y = np.r_[np.zeros(len(real)), np.ones(len(outliers))]
    model = LogisticRegression(C=variant.regularisation, class_weight="balanced", max_iter=3000)
    model.fit((both - mean) / scale, y)
    detector = replace(
        base,
        signal_mean=mean.astype(np.float32),
        signal_scale=scale.astype(np.float32),
        weights=model.coef_[0].astype(np.float32),
        bias=float(model.intercept_[0]),
    )
    detector.threshold = float(np.quantile(detector.score_signals(val), 1 - FALSE_FLAG_RATE))
    return detector


def auroc(negatives: ArrayLike, positives: ArrayLike) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    from sklearn.metrics import roc_auc_score

    neg, pos = np.asarray(negatives), np.asarray(positives)
    return float(roc_auc_score(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos]))


def outlier_set_names() -> list[str]:
    """'train/<kind>' for each training kind, 'eval/<kind>' for each evaluation kind."""
    from ml import outliers as O

    return [f"train/{k}" for k in O.TRAINING_KINDS] + [f"eval/{k}" for k in O.EVALUATION_KINDS]


def outlier_sets(data: str, split_csv: Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The generated images of `names` (default all `outlier_set_names`): 'train/<kind>' (seed 1,
    the training split's masks) and 'eval/<kind>' (seed 2, the test split's masks and skin)."""
    from ml import data as D
    from ml import outliers as O

    table = D.apply_split(D.read_dataset(data), split_csv)
    paths = {s: list(table.loc[table["split"] == s, "path"]) for s in ("train", "test")}

    def draw(name: str) -> np.ndarray:
        part, kind = name.split("/")
        split, n, seed = (
            ("train", TRAIN_PER_KIND, TRAIN_SEED) if part == "train" else ("test", EVAL_PER_KIND, EVAL_SEED)
        )
        return O.ham_outliers(paths[split], kind, n, seed) if kind in O.FROM_HAM10000 else O.generate(kind, n, seed)

    return {name: draw(name) for name in (outlier_set_names() if names is None else names)}


def _cached(cache: Path | None) -> dict[str, np.ndarray]:
    if cache is None or not cache.is_file():
        return {}
    with np.load(cache) as f:
        return {k: f[k] for k in f.files}


def outlier_embeddings(model_dir: Path, data: str, cache: Path | None = None) -> dict[str, np.ndarray]:
    """Pooled embeddings of `outlier_sets`, by set name (cached in `cache` when given; only the sets
    the cache lacks, a kind added to the recipe for instance, are computed)."""
    out = {k[: -len("/emb")]: v for k, v in _cached(cache).items() if k.endswith("/emb")}
    missing = [name for name in outlier_set_names() if name not in out]
    if missing:
        from ml.predictor import Predictor

        predictor = Predictor.load(model_dir)
        for name, images in outlier_sets(data, model_dir / "split.csv", missing).items():
            batch = np.stack([predictor.preprocess(im) for im in images])
            out[name] = predictor.embed_and_predict_raw(batch)[0]
        if cache is not None:
            np.savez(cache, **{f"{k}/emb": v for k, v in out.items()})
    return {name: out[name] for name in outlier_set_names()}


def image_statistics(model_dir: Path, data: str, cache: Path | None = None) -> dict[str, np.ndarray]:
    """`ml.image_stats.statistics` at the model's input size of the split's images (by split, in
    the order of `ml.retrieval.split_embeddings`) and of `outlier_sets` (by set name); cached in
    `cache` when given (only what it lacks is computed), since decoding the dataset takes minutes."""
    from ml import data as D
    from ml.artifact import read_manifest

    out = _cached(cache)
    before = set(out)
    size = tuple(int(s) for s in read_manifest(model_dir)["input_size"])
    missing = [name for name in outlier_set_names() if name not in out]
    sets = outlier_sets(data, model_dir / "split.csv", missing) if missing else {}
    out.update({name: image_stats.statistics(images, size) for name, images in sets.items()})
    splits = ("train", "val", "test")
    if not set(splits) <= set(out):
        table = D.apply_split(D.read_dataset(data), model_dir / "split.csv")
        every = image_stats.statistics(D.load_images(table["path"], size), size)
        out.update({split: every[(table["split"] == split).to_numpy()] for split in splits})
    if cache is not None and set(out) != before:
        np.savez(cache, **out)
    return out


def scores(detector: OodDetector, inputs: Inputs) -> np.ndarray:
    """`detector.score` of images whose statistics are already computed."""
    return detector.score_signals(detector.signals(*inputs))


def evaluate(detector: OodDetector, real_test: Inputs, outliers: dict[str, Inputs]) -> dict:
    """AUROC of evaluation outliers against test dermoscopy (all kinds; held-out kinds only),
    flagged per kind, and the share of flagged test dermoscopy."""
    from ml.outliers import TRAINING_KINDS

    real = scores(detector, real_test)
    evaluation = {k.split("/", 1)[1]: scores(detector, v) for k, v in outliers.items() if k.startswith("eval/")}
    held_out = [s for k, s in evaluation.items() if k not in TRAINING_KINDS]
    return {
        "threshold": detector.threshold,
        "test_dermoscopy_flagged": float(detector.flagged(real).mean()),
        "auroc_all_kinds": auroc(real, np.concatenate(list(evaluation.values()))),
        "auroc_held_out_kinds": auroc(real, np.concatenate(held_out)),
        "flagged_per_kind": {
            k: {"flagged": int(detector.flagged(s).sum()), "n": int(len(s)), "in_training": k in TRAINING_KINDS}
            for k, s in evaluation.items()
        },
    }


def dense_head(model_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The classifier's dense kernel and bias, read from the artifact's weights."""
    from ml.predictor import Predictor

    kernel, bias = Predictor.load(model_dir).model.get_layer("predictions").get_weights()
    return kernel, bias


def arguments(description: str) -> argparse.ArgumentParser:
    """The command-line options of this module and `ml.ood_choice`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", type=Path, default=Path("models/default"))
    parser.add_argument("--data", default="../shared/data/ham10000-200x150")
    parser.add_argument("--cache", type=Path, help=".npz of the split's embeddings (ml.retrieval --cache)")
    parser.add_argument("--outlier-cache", type=Path, help=".npz of the generated images' embeddings")
    parser.add_argument("--stats-cache", type=Path, help=".npz of every image's statistics (ml.image_stats)")
    parser.add_argument("--write", action="store_true", help="store the detector in the artifact")
    return parser


def inputs(args: argparse.Namespace) -> tuple[dict, np.ndarray, dict, tuple[np.ndarray, np.ndarray], tuple]:
    """(Inputs by split, training labels as indices, Inputs by outlier set, dense head, input size)."""
    from ml import data as D
    from ml.artifact import read_manifest
    from ml.retrieval import split_embeddings

    emb, _, labels, _ = split_embeddings(args.model, args.data, args.cache)
    outliers = outlier_embeddings(args.model, args.data, args.outlier_cache)
    stats = image_statistics(args.model, args.data, args.stats_cache)
    real = {split: Inputs(e, stats[split]) for split, e in emb.items()}
    other = {name: Inputs(e, stats[name]) for name, e in outliers.items()}
    size = tuple(int(s) for s in read_manifest(args.model)["input_size"])
    return real, D.labels_to_indices(labels["train"]), other, dense_head(args.model), size


def write(model_dir: Path, detector: OodDetector, report: dict) -> None:
    """Stores the detector in the artifact (`ood.npz`) and its figures in `manifest["ood"]`."""
    detector.save(model_dir / OOD_FILE)
    manifest_path = model_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["ood"] = {"file": OOD_FILE, "false_flag_rate_validation": FALSE_FLAG_RATE, **report}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")


def training_outliers(outliers: dict[str, Inputs], kinds) -> Inputs:
    """The outlier-exposure images of `kinds`, as one Inputs."""
    chosen = [outliers[f"train/{k}"] for k in kinds]
    return Inputs(*(np.concatenate(parts) for parts in zip(*chosen)))


def main(argv: list[str] | None = None) -> int:
    from ml.outliers import TRAINING_KINDS

    args = arguments("Fit and measure the artifact's variant of the out-of-distribution detector.").parse_args(argv)
    variant = artifact_variant(args.model)
    real, y, outliers, head, size = inputs(args)
    exposure = training_outliers(outliers, TRAINING_KINDS)
    detector = fit(real["train"], y, exposure, real["val"], head, head[0].shape[1], size, variant)
    report = {"variant": asdict(variant), **evaluate(detector, real["test"], outliers)}
    print(json.dumps(report, indent=2))
    if args.write:
        write(args.model, detector, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
