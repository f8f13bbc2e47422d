"""The stored image embedding: a projection of the network's pooled features for similar-case search.

Every analysis stores its image's embedding so that the portal can show the most similar prior
cases (webapp.similar). The 1536-d `avg_pool` output would cost 3 KB a row in float16; a PCA
projection fitted on the artifact's training split keeps what separates the images in far fewer
dimensions, and its L2-normalised float16 form (256 bytes at 128 dims) is what is stored and
indexed: the inner product of two stored vectors is their cosine similarity.

    python -m ml.retrieval --model models/default --data ../shared/data/ham10000-200x150 [--write]

fits projections of several sizes on the training split, measures precision@5 of the label on
the validation split (prior cases: training images; no neighbour sharing the query's lesion),
picks the best size there, reports it on the test split (prior cases: training and validation
images), and with --write stores it in the artifact (`retrieval.npz`, `manifest["retrieval"]`).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

log = logging.getLogger("ml.retrieval")

RETRIEVAL_FILE = "retrieval.npz"
DIMENSIONS = (64, 128, 256)  # the projection sizes compared on the validation split
# A projection this close to the best validation precision is preferred: it is 6-24 times smaller to
# store and to search than the raw embedding.
TOLERANCE = 0.01
K = 5


def l2_normalise(x: ArrayLike) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


@dataclass
class Projection:
    """Centring and PCA rotation of the pooled embedding, then L2 normalisation.

    Attributes:
        mean: (D,) training-split mean of the pooled embedding.
        components: (D, d) the first d principal axes (columns).
    """

    mean: np.ndarray
    components: np.ndarray

    @property
    def dims(self) -> int:
        return int(self.components.shape[1])

    @classmethod
    def fit(cls, embeddings: ArrayLike, dims: int) -> Projection:
        """PCA of the (N, D) training embeddings, keeping `dims` axes.

        Raises:
            ValueError: if `dims` exceeds the embedding size or the number of rows.
        """
        x = np.asarray(embeddings, np.float64)
        if not 0 < dims <= min(x.shape):
            raise ValueError(
                f"A projection to {dims} dimensions needs at least that many rows and features; got {x.shape}."
            )
        mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        return cls(mean.astype(np.float32), vt[:dims].T.astype(np.float32))

    def __call__(self, embeddings: ArrayLike) -> np.ndarray:
        """(N, D) pooled embeddings -> (N, d) float32 unit vectors."""
        return l2_normalise((np.asarray(embeddings, np.float32) - self.mean) @ self.components)

    def save(self, path: str | Path) -> None:
        np.savez(path, mean=self.mean, components=self.components.astype(np.float16))

    @classmethod
    def load(cls, path: str | Path) -> Projection:
        with np.load(path) as f:
            return cls(f["mean"].astype(np.float32), f["components"].astype(np.float32))

    @classmethod
    def from_artifact(cls, folder: str | Path, manifest: dict) -> Projection | None:
        """The artifact's projection, or None when it has none (the raw embedding is then stored)."""
        info = manifest.get("retrieval")
        if not info:
            return None
        return cls.load(Path(folder) / info.get("file", RETRIEVAL_FILE))


def to_bytes(vector: ArrayLike) -> bytes:
    """One stored embedding: float16, little-endian."""
    return np.asarray(vector, dtype="<f2").tobytes()


def from_bytes(blob: bytes) -> np.ndarray:
    """The float32 vector of a stored embedding."""
    return np.frombuffer(blob, dtype="<f2").astype(np.float32)


def precision_at_k(
    queries: ArrayLike,
    query_labels: ArrayLike,
    query_lesions: ArrayLike,
    prior: ArrayLike,
    prior_labels: ArrayLike,
    prior_lesions: ArrayLike,
    k: int = K,
) -> float:
    """Mean over queries of the share of the k most cosine-similar prior images with the query's
    label, never counting a prior image of the query's own lesion (a second photograph of the same
    lesion is not a similar case, and it would flatter the figure)."""
    q, p = l2_normalise(queries), l2_normalise(prior)
    query_labels, prior_labels = np.asarray(query_labels), np.asarray(prior_labels)
    query_lesions, prior_lesions = np.asarray(query_lesions), np.asarray(prior_lesions)
    hits = []
    for start in range(0, len(q), 512):
        sims = q[start : start + 512] @ p.T
        same = query_lesions[start : start + 512, None] == prior_lesions[None, :]
        sims[same] = -np.inf
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        hits.append((prior_labels[top] == query_labels[start : start + 512, None]).mean(axis=1))
    return float(np.concatenate(hits).mean()) if hits else float("nan")


def choose_projection(emb: dict, labels: dict, lesions: dict) -> tuple[Projection | None, dict]:
    """Fits each size of DIMENSIONS on the training split and keeps the smallest whose validation
    precision@5 is within TOLERANCE of the best (raw included); None (the raw embedding) when none
    is. Returns it and the figures."""
    figures = {
        "raw": precision_at_k(
            emb["val"], labels["val"], lesions["val"], emb["train"], labels["train"], lesions["train"]
        )
    }
    fitted = {}
    for dims in DIMENSIONS:
        fitted[dims] = projection = Projection.fit(emb["train"], dims)
        figures[f"pca{dims}"] = precision_at_k(
            projection(emb["val"]),
            labels["val"],
            lesions["val"],
            projection(emb["train"]),
            labels["train"],
            lesions["train"],
        )
    best_score = max(figures.values())
    good = [dims for dims in DIMENSIONS if figures[f"pca{dims}"] >= best_score - TOLERANCE]
    best = fitted[min(good)] if good else None
    return best, figures


def test_precision(projection: Projection | None, emb: dict, labels: dict, lesions: dict) -> float:
    """precision@5 on the test split against the training and validation images."""
    prior = np.concatenate([emb["train"], emb["val"]])
    project = projection if projection is not None else l2_normalise
    return precision_at_k(
        project(emb["test"]),
        labels["test"],
        lesions["test"],
        project(prior),
        np.concatenate([labels["train"], labels["val"]]),
        np.concatenate([lesions["train"], lesions["val"]]),
    )


def split_embeddings(model_dir: Path, data: str, cache: Path | None = None):
    """(embeddings, raw outputs, labels, lesions), each a dict by split, of the artifact's split of
    the dataset; read from / written to `cache` (.npz) when given, since the pass takes minutes."""
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=True) as f:
            parts = {name: f[name] for name in f.files}
    else:
        from ml import data as D
        from ml.predictor import Predictor

        predictor = Predictor.load(model_dir)
        table = D.apply_split(D.read_dataset(data), model_dir / "split.csv")
        images = D.load_images(table["path"], predictor.input_size).astype(np.float32)
        emb, raw = predictor.embed_and_predict_raw(images)
        parts = {
            "emb": emb,
            "raw": raw,
            "dx": table["dx"].to_numpy(str),
            "lesion_id": table["lesion_id"].to_numpy(str),
            "split": table["split"].to_numpy(str),
        }
        if cache is not None:
            np.savez(cache, **parts)
    by_split = {name: parts["split"] == name for name in ("train", "val", "test")}
    pick = lambda key: {name: parts[key][rows] for name, rows in by_split.items()}  # noqa: E731
    return pick("emb"), pick("raw"), pick("dx"), pick("lesion_id")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fit and measure the stored embedding's projection.")
    parser.add_argument("--model", type=Path, default=Path("models/default"))
    parser.add_argument("--data", default="../shared/data/ham10000-200x150")
    parser.add_argument("--cache", type=Path, help=".npz of the split's embeddings (made when absent)")
    parser.add_argument("--write", action="store_true", help="store the chosen projection in the artifact")
    args = parser.parse_args(argv)
    emb, _, labels, lesions = split_embeddings(args.model, args.data, args.cache)
    projection, figures = choose_projection(emb, labels, lesions)
    report = {
        "validation_precision_at_5": figures,
        "chosen": f"pca{projection.dims}" if projection else "raw",
        "test_precision_at_5": test_precision(projection, emb, labels, lesions),
        "test_precision_at_5_raw": test_precision(None, emb, labels, lesions),
    }
    print(json.dumps(report, indent=2))
    if args.write and projection is not None:
        projection.save(args.model / RETRIEVAL_FILE)
        manifest_path = args.model / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["retrieval"] = {"file": RETRIEVAL_FILE, "dims": projection.dims, "dtype": "float16", **report}
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
