"""ml.retrieval (the stored embedding and precision@k), ml.ood (the detector), ml.outliers (the
out-of-distribution set's recipe) and worker.similarity with the shipped artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ml import image_stats, outliers
from ml.ood import Inputs, OodDetector, auroc, fit, scores
from ml.retrieval import Projection, from_bytes, precision_at_k, to_bytes

ARTIFACT = Path(__file__).resolve().parents[2] / "models" / "default"


def test_precision_at_k_never_counts_the_query_lesion():
    prior = np.array([[1, 0], [0.99, 0.1], [0, 1], [0.1, 0.99]], np.float32)
    labels, lesions = np.array(["mel", "mel", "nv", "nv"]), np.array(["L1", "L2", "L3", "L4"])
    query = np.array([[1, 0.05]], np.float32)
    assert precision_at_k(query, ["mel"], ["L9"], prior, labels, lesions, k=2) == 1.0
    # The nearest prior image is the query's own lesion: it is skipped, so a "nv" comes in.
    assert precision_at_k(query, ["mel"], ["L1"], prior, labels, lesions, k=2) == 0.5


def test_projection_round_trip_gives_unit_float16_vectors(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.normal(size=(50, 12)).astype(np.float32)
    projection = Projection.fit(train, 4)
    projection.save(tmp_path / "p.npz")
    loaded = Projection.load(tmp_path / "p.npz")
    vectors = loaded(train[:3])
    assert vectors.shape == (3, 4) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    stored = to_bytes(vectors[0])
    assert len(stored) == 8 and np.allclose(from_bytes(stored), vectors[0], atol=1e-3)
    with pytest.raises(ValueError, match="dimensions"):
        Projection.fit(train, 13)


def test_outlier_kinds_are_reproducible_and_separate():
    assert np.array_equal(outliers.generate("document", 2, 7), outliers.generate("document", 2, 7))
    assert not np.array_equal(outliers.generate("noise", 1, 1), outliers.generate("noise", 1, 2))
    assert outliers.generate("chart", 1, 0).shape == (1, *outliers.SIZE, 3)
    assert {"photo", "chart", "xray", "skin"}.isdisjoint(outliers.TRAINING_KINDS)


def test_detector_separates_a_shifted_cluster_and_keeps_its_false_flag_rate(tmp_path):
    rng = np.random.default_rng(1)
    real = rng.normal(size=(600, 80)).astype(np.float32)
    labels = rng.integers(0, 3, 600)
    odd = rng.normal(loc=3.0, size=(200, 80)).astype(np.float32)
    head = (rng.normal(size=(80, 3)).astype(np.float32), np.zeros(3, np.float32))
    size = (12, 16)
    pictures = rng.integers(0, 256, (800, *size, 3), dtype=np.uint8)
    stats = image_stats.statistics(pictures, size)  # uninformative here: the embeddings separate
    both = Inputs(np.concatenate([real, odd]), stats)
    part = lambda a, b: Inputs(both.embeddings[a:b], both.statistics[a:b])  # noqa: E731
    detector = fit(part(0, 400), labels[:400], part(600, 700), part(400, 500), head, 3, size)
    assert np.mean(detector.flagged(scores(detector, part(400, 500)))) <= 0.06
    assert auroc(scores(detector, part(500, 600)), scores(detector, part(700, 800))) > 0.95
    detector.save(tmp_path / "ood.npz")
    loaded = OodDetector.load(tmp_path / "ood.npz")
    assert np.allclose(loaded.score(odd[:5], pictures[600:605]), scores(detector, part(600, 605)), atol=1e-5)


@pytest.mark.slow
def test_the_shipped_artifact_describes_an_image_and_flags_noise():
    from ml.ood import OodDetector as Detector
    from ml.predictor import Predictor
    from ml.retrieval import Projection as Proj

    predictor = Predictor.load(ARTIFACT)
    projection = Proj.from_artifact(ARTIFACT, predictor.manifest)
    detector = Detector.from_artifact(ARTIFACT, predictor.manifest)
    noise = outliers.generate("noise", 3, 99)
    pooled, _ = predictor.embed_and_predict_raw(np.stack([predictor.preprocess(im) for im in noise]))
    assert projection(pooled).shape == (3, predictor.manifest["retrieval"]["dims"])
    assert detector.flagged(detector.score(pooled, noise)).sum() >= 2
    # The worker's step: what each analysis stores, from the same artifact.
    from types import SimpleNamespace

    from worker.similarity import describe

    described = describe(pooled, list(noise), SimpleNamespace(artifact_path=str(ARTIFACT)))
    assert [len(d.embedding) for d in described] == [2 * predictor.manifest["retrieval"]["dims"]] * 3
    assert all(0 <= d.ood_score <= 1 and d.ood_flagged == (d.ood_score > detector.threshold) for d in described)
