"""The training recipe and the served decision: logit-adjusted loss, cosine schedule, the prior folded
into the head, the validation-chosen decision, metadata fusion and snapshots of a running training."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from ml_helpers import TINY_SIZE, run_module

from ml import fusion as F
from ml import metadata as MD
from ml.calibration import calibrated_softmax
from ml.decision import Decision, class_prior, fit_decision
from ml.losses import LogitAdjustedCrossentropy
from ml.train import cosine_lr, early_stop_due


def test_logit_adjusted_loss_is_cross_entropy_of_log_p_plus_tau_log_prior():
    prior = np.array([0.7, 0.2, 0.1])
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], np.float32)
    onehot = np.eye(3, dtype=np.float32)[[1, 2]]
    loss = LogitAdjustedCrossentropy(prior, tau=1.0, label_smoothing=0.1)
    logits = np.log(probs) + np.log(prior)
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    target = onehot * 0.9 + 0.1 / 3
    expected = -(target * log_softmax).sum(1).mean()
    assert float(loss(onehot, probs)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="class prior"):
        LogitAdjustedCrossentropy([-1.0, 2.0])


def test_cosine_schedule_warms_up_then_decays_to_the_minimum():
    args = SimpleNamespace(lr=1e-3, min_lr=1e-6, epochs=10, lr_warmup_epochs=1)
    rates = [cosine_lr(e, args) for e in range(10)]
    assert rates[0] == pytest.approx(5e-4)
    assert rates[1] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(rates[1:], rates[2:]))
    assert cosine_lr(10, args) == pytest.approx(1e-6)


def test_a_cosine_schedule_runs_to_its_end_where_a_plateau_schedule_stops_early():
    waited = {"es_wait": 8}
    assert early_stop_due(waited, SimpleNamespace(schedule="plateau", patience=8))
    assert not early_stop_due({"es_wait": 7}, SimpleNamespace(schedule="plateau", patience=8))
    assert not early_stop_due(waited, SimpleNamespace(schedule="cosine", patience=8))


def test_decision_with_tau_zero_is_the_argmax_and_tau_one_favours_rare_classes():
    prior = (0.9, 0.1)
    probs = np.array([[0.8, 0.2], [0.95, 0.05]])
    np.testing.assert_array_equal(Decision(0.0, prior).choose(probs), [0, 0])
    # 0.2 / 0.1 > 0.8 / 0.9: the rare class wins the first image once the prior is divided out.
    np.testing.assert_array_equal(Decision(1.0, prior).choose(probs), [1, 0])
    restored = Decision.from_manifest({"decision": Decision(1.0, prior).to_manifest()})
    assert restored == Decision(1.0, prior)
    assert Decision.from_manifest({}) == Decision()
    assert "highest probability" in Decision().description and "1" in Decision(1.0, prior).description


def test_fit_decision_chooses_tau_on_the_given_labels_only():
    rng = np.random.default_rng(0)
    y = np.array([0] * 90 + [1] * 10)
    # A model biased to the common class: the rare class's probability is low but informative.
    p1 = np.where(y == 1, rng.uniform(0.2, 0.45, 100), rng.uniform(0.0, 0.25, 100))
    probs = np.stack([1 - p1, p1], axis=1)
    prior = class_prior(y, 2)
    decision, scores = fit_decision(y, probs, prior)
    assert scores[0.0] < scores[decision.tau] and decision.tau > 0
    assert scores[decision.tau] == max(scores.values())


def test_the_prior_folded_into_the_head_turns_balanced_outputs_into_posteriors(tiny_predictor):
    from ml.model import shift_head_bias

    model = tiny_predictor.model
    images = np.random.default_rng(1).integers(0, 256, (3, *TINY_SIZE, 3)).astype(np.float32)
    before = model.predict(images, verbose=0)
    shift = np.log(np.array([0.05, 0.05, 0.1, 0.02, 0.1, 0.65, 0.03]))
    saved = model.get_layer("predictions").get_weights()
    try:
        shift_head_bias(model, shift)
        after = model.predict(images, verbose=0)
    finally:
        model.get_layer("predictions").set_weights(saved)
    np.testing.assert_allclose(after, calibrated_softmax(np.log(before) + shift), atol=1e-5)
    with pytest.raises(ValueError, match="7 classes"):
        shift_head_bias(model, [0.0, 1.0])


def test_predictor_top_classes_follow_the_manifests_decision(tiny_predictor):
    probs = np.full((1, 7), 0.1)
    probs[0, 5], probs[0, 4] = 0.35, 0.05  # nv first by probability
    prior = (0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02)
    saved = tiny_predictor.decision
    try:
        tiny_predictor.decision = Decision(1.0, prior)
        assert tiny_predictor.top_classes(probs) == ["df"]  # 0.1 / 0.01 is the largest ratio
        tiny_predictor.decision = Decision()
        assert tiny_predictor.top_classes(probs) == ["nv"]
    finally:
        tiny_predictor.decision = saved


def test_metadata_vector_marks_missing_values():
    full = MD.metadata_vector(45, "female", "Lower_Extremity")
    names = MD.METADATA_FEATURES
    assert full[names.index("age_over_100")] == pytest.approx(0.45)
    assert full[names.index("sex_female")] == 1 and full[names.index("site_lower extremity")] == 1
    assert full[[names.index(n) for n in ("age_missing", "sex_missing", "site_missing")]].sum() == 0
    missing = MD.metadata_vector(float("nan"), "unknown", "unknown")
    np.testing.assert_array_equal(missing, MD.MISSING_METADATA)
    assert missing[[names.index(n) for n in ("age_missing", "sex_missing", "site_missing")]].sum() == 3


def test_fusion_head_uses_metadata_and_still_answers_without_it(tmp_path):
    rng = np.random.default_rng(0)
    n = 600
    y = rng.integers(0, 3, n)
    embeddings = rng.normal(size=(n, 16)).astype(np.float32) + y[:, None] * 0.4  # weakly informative image
    sites = np.array(["back", "face", "foot"])[y]  # site tells the class
    meta = np.stack([MD.metadata_vector(50, "male", s) for s in sites])
    head = F.fit_head(embeddings, meta, y, num_classes=4, c=1.0)
    with_meta = head.logits(embeddings, meta).argmax(1)
    without = head.logits(embeddings, np.repeat(MD.MISSING_METADATA[None], n, 0)).argmax(1)
    assert (with_meta == y).mean() > 0.95
    assert 0.4 < (without == y).mean() < (with_meta == y).mean()
    assert head.logits(embeddings[:1], meta[:1])[0, 3] < -10  # a class absent from training
    head.save(tmp_path / "fusion.npz")
    loaded = MD.FusionHead.load(tmp_path / "fusion.npz")
    np.testing.assert_allclose(loaded.logits(embeddings, meta), head.logits(embeddings, meta), rtol=1e-6)


def test_logit_adjusted_run_snapshot_is_a_calibrated_artifact_with_its_decision(trained_run, synthetic_ham, tmp_path):
    run = tmp_path / "la"
    run_module(
        "ml.train",
        "--data",
        str(synthetic_ham),
        "--out",
        str(run),
        "--epochs",
        "2",
        "--img-size",
        *map(str, TINY_SIZE),
        "--batch-size",
        "16",
        "--loss",
        "logit_adjusted",
        "--label-smoothing",
        "0.1",
        "--balance",
        "none",
        "--schedule",
        "cosine",
        "--init-from",
        str(trained_run / "model.weights.h5"),
        "--bootstrap",
        "10",
        "--verbose",
        "2",
        "--run-eagerly",
    )
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["decision"]["rule"] in ("argmax", "logit_adjusted_argmax")
    assert len(manifest["decision"]["class_prior"]) == 7 and manifest["decision_fit"]["split"] == "val"
    assert "warm start" in (run / "train.log").read_text()
    history = [line.split(",") for line in (run / "history.csv").read_text().splitlines()[1:]]
    assert len(history) == 2 and float(history[1][2]) < float(history[0][2])  # cosine: the rate falls
    snapshot = tmp_path / "snapshot"
    run_module(
        "ml.train",
        "--out",
        str(run),
        "--snapshot",
        str(snapshot),
        "--model-version",
        "9.9.9",
        "--bootstrap",
        "10",
        "--data",
        str(synthetic_ham),
    )
    shot = json.loads((snapshot / "manifest.json").read_text())
    assert shot["version"] == "9.9.9" and (snapshot / "eval_test" / "metrics.json").is_file()
    assert (snapshot / "split.csv").read_text() == (run / "split.csv").read_text()
    assert "recall_at_decision" in json.loads((snapshot / "eval_test" / "metrics.json").read_text())["melanoma"]


def test_grad_cam_of_the_top_class_explains_the_decided_class(tiny_predictor):
    from ml.explain import explain_gradcam

    images = [np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8) for i in range(4)]
    plain = explain_gradcam(tiny_predictor, images)
    saved = tiny_predictor.decision
    try:
        # A prior under which one class (the first image's runner-up) is so rare that it always wins.
        favoured = int(np.argsort(plain.probs[0])[-2])
        prior = np.full(7, 0.5)
        prior[favoured] = 1e-6
        tiny_predictor.decision = Decision(1.0, tuple(prior / prior.sum()))
        decided = explain_gradcam(tiny_predictor, images)
    finally:
        tiny_predictor.decision = saved
    np.testing.assert_allclose(decided.probs, plain.probs, atol=1e-6)  # the shown probabilities do not change
    np.testing.assert_array_equal(decided.class_indices, [favoured] * 4)
    assert (decided.class_indices != plain.class_indices).any()


def test_agreement_compares_the_top_class_on_two_copies_of_the_same_images(trained_run, synthetic_ham, tmp_path):
    from ml.evaluate import agreement
    from ml.synthetic import make_ham10000_like

    larger = make_ham10000_like(tmp_path / "large", lesions_per_class=4, size=(120, 160), max_images_per_lesion=2)
    result = agreement(trained_run, larger, synthetic_ham, tmp_path / "out")
    assert result["n"] == len(pd.read_csv(larger / "HAM10000_metadata.csv"))
    assert 0 <= result["agree"] <= result["n"] and result["agreement"] == result["agree"] / result["n"]
    assert json.loads((tmp_path / "out" / "agreement.json").read_text())["n"] == result["n"]
    same = agreement(trained_run, synthetic_ham, synthetic_ham, tmp_path / "same")
    assert same["agreement"] == 1.0 and same["max_probability_difference"] == 0.0


def test_metadata_changes_the_answer_only_for_cases_that_have_metadata(tiny_predictor, tmp_path):
    rng = np.random.default_rng(5)
    head = MD.FusionHead.neutral(7)
    head.weights[7 + MD.METADATA_FEATURES.index("site_acral"), 3] = 50.0  # acral site: df
    np.testing.assert_allclose(head.weights[:7], 0)
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)]
    metadata = np.stack(
        [MD.MISSING_METADATA, MD.metadata_vector(30, "male", "acral"), MD.metadata_vector(30, "male", "back")]
    )
    saved = tiny_predictor.metadata_head
    try:
        tiny_predictor.metadata_head = MD.MetadataHead(head, 1.0, Decision())
        probs, chosen, used = tiny_predictor.predict_with_metadata(images, metadata)
    finally:
        tiny_predictor.metadata_head = saved
    plain = tiny_predictor.predict(images)
    assert used.tolist() == [False, True, True]
    np.testing.assert_allclose(probs[0], plain[0], atol=1e-6)  # no metadata: the network's answer
    assert chosen[1] == 3 and probs[1, 3] > 0.99
    np.testing.assert_allclose(probs[2], np.full(7, 1 / 7), atol=1e-6)  # this head ignores the image


def test_an_artifact_ships_its_metadata_head(trained_run, tmp_path):
    import shutil

    from ml.predictor import Predictor

    folder = tmp_path / "artifact"
    shutil.copytree(trained_run, folder, ignore=shutil.ignore_patterns("checkpoints", "eval_test"))
    assert Predictor.load(folder).metadata_head is None
    head = MD.FusionHead.neutral(7)
    head.save(folder / MD.FUSION_FILE)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["fusion"] = {
        "file": MD.FUSION_FILE,
        "image_features": "log_probs",
        "temperature": 1.3,
        "decision": Decision(0.5, (0.5, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05)).to_manifest(),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    loaded = Predictor.load(folder).metadata_head
    assert loaded.temperature == 1.3 and loaded.decision.tau == 0.5
    manifest["fusion"]["image_features"] = "embedding"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="log-probabilities"):
        Predictor.load(folder)


def test_the_test_evaluation_reports_the_head_with_and_without_metadata_beside_the_network(
    trained_run, synthetic_ham, tmp_path
):
    import shutil

    folder = tmp_path / "artifact"
    shutil.copytree(trained_run, folder, ignore=shutil.ignore_patterns("checkpoints"))
    head = MD.FusionHead.neutral(7)
    nv = 5
    head.weights[7 + MD.METADATA_FEATURES.index("site_back"), nv] = 50.0  # every synthetic lesion is on the back
    head.save(folder / MD.FUSION_FILE)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["fusion"] = {"file": MD.FUSION_FILE, "image_features": "log_probs", "temperature": 1.0}
    (folder / "manifest.json").write_text(json.dumps(manifest))

    report = F.evaluate_on_test(folder, str(synthetic_ham), n_boot=20)

    test_rows = pd.read_csv(folder / "split.csv").query("split == 'test'")
    assert report["images"] == len(test_rows)
    served = json.loads((trained_run / "eval_test" / "metrics.json").read_text())
    assert report["network_alone"]["balanced_accuracy"]["estimate"] == pytest.approx(served["balanced_accuracy"])
    assert report["with_metadata"]["balanced_accuracy"]["estimate"] == pytest.approx(1 / 7)  # all called nv
    assert report["with_metadata"]["melanoma_recall"]["estimate"] == 0.0
    blank = report["head_without_metadata"]["balanced_accuracy"]["estimate"]
    assert blank == pytest.approx(1 / 7)  # without metadata this head is uniform: one class for all
