"""`python -m ml.model_card --artifact models/NAME [--eval DIR] [--run runs/NAME]`: the model card.

Writes `MODEL_CARD.md` and `LICENSE-DATA.md` into the artifact folder from what the artifact itself
records (manifest.json, and the test evaluation's metrics.json written by `ml.evaluate`), so that the
card never states a figure that the shipped files do not back. The targets are the project's
(issue 18): balanced accuracy >= 0.65, macro AUC >= 0.92, ECE <= 0.05 and melanoma recall >= 0.60 at
the shown decision, on the lesion-disjoint test split; the card says plainly which were reached.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from pathlib import Path

TARGETS = {
    "balanced_accuracy": (0.65, ">="),
    "macro_auc": (0.92, ">="),
    "ece": (0.05, "<="),
    "melanoma_recall": (0.60, ">="),
}

HAM10000_LICENCE = """# Data licence and citation

The weights in this folder were trained on HAM10000 images, so they carry the dataset's licence:
**CC BY-NC 4.0** (non-commercial use, with attribution; https://creativecommons.org/licenses/by-nc/4.0/).

Cite: Tschandl P., Rosendahl C., Kittler H. The HAM10000 dataset, a large collection of
multi-source dermatoscopic images of common pigmented skin lesions. Sci. Data 5, 180161 (2018).
doi:10.1038/sdata.2018.161.

The training images were the 200x150 downscales of HAM10000 provided with this project
(`../shared/data/ham10000-200x150/`, 8,915 images of 6,660 lesions; see its README.md).
"""

NEXT_STEPS = """- **Pretrained weights first, then longer training.** From scratch on this CPU, validation
  balanced accuracy rose quickly over the first ~20 epochs and then moved within noise (see
  `history.csv` of the run); `python -m ml.train --out RUN --resume --epochs N` continues it from the
  committed float16 carry-over (7-10 minutes per epoch at 120x160 here; a GPU machine runs the same
  code, Keras 3 on the JAX backend where TensorFlow is missing).
- **Pretrained weights.** Fine-tuning from ImageNet EfficientNetB3 weights (`--weights
  /path/to/efficientnetb3_notop.h5`) is how published HAM10000 models reach their figures; expected
  to be the largest single gain, not measured here (the weights could not be downloaded).
- **Resolution and data.** The full 150x200 of the provided images (or original-resolution
  images at 300x400 on a GPU), ISIC 2019 (25k images; `ml.data` reads its ground-truth CSV), and
  the withheld HAM10000 lesions as an external test set.
"""


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def fmt_ci(ci: dict | None) -> str:
    """'0.612 (95 % CI 0.58-0.64)' from a bootstrap_ci dict, or the bare estimate."""
    if not ci:
        return "n/a"
    if ci.get("low") is None:
        return fmt(ci.get("estimate"))
    level = round(float(ci.get("level", 0.95)) * 100)
    return (
        f"{fmt(ci['estimate'])} ({level} % CI {fmt(ci['low'])}-{fmt(ci['high'])}, lesion bootstrap x{ci.get('n_boot')})"
    )


def target_value(metrics: dict, key: str) -> float | None:
    """The test figure a target is about (melanoma recall lives under `melanoma`)."""
    if key == "melanoma_recall":
        return (metrics.get("melanoma") or {}).get("recall_at_decision")
    return metrics.get(key)


def target_rows(metrics: dict) -> list[str]:
    rows = []
    for key, (goal, sign) in TARGETS.items():
        value = target_value(metrics, key)
        met = _meets(value, goal, sign)
        rows.append(f"| {key.replace('_', ' ')} | {fmt(value)} | {sign} {goal} | {'**met**' if met else 'not met'} |")
    return rows


def per_class_rows(metrics: dict, long_names: dict) -> list[str]:
    rows = []
    for name, m in metrics.get("per_class", {}).items():
        rows.append(
            f"| {name} ({long_names.get(name, name)}) | {m['support']} | {fmt(m['recall'])} | "
            f"{fmt(m['precision'])} | {fmt(m['roc_auc'])} |"
        )
    return rows


def split_rows(split: dict) -> list[str]:
    """Images and lesions per part of the split, as ml.data.split_summary records them."""
    rows = []
    for part in ("train", "val", "test"):
        info = split.get(part)
        if isinstance(info, dict):
            counts = info.get("per_class") or info.get("classes") or {}
            per_class = ", ".join(f"{c} {n}" for c, n in counts.items())
            rows.append(f"| {part} | {info.get('images', 'n/a')} | {info.get('lesions', 'n/a')} | {per_class} |")
    return rows


def weak_classes(metrics: dict | None, below: float = 0.3) -> str | None:
    """'df (recall 0.00, 12 test images), ...' for the classes the model rarely finds, or None."""
    weak = [(name, m) for name, m in (metrics or {}).get("per_class", {}).items() if m["recall"] < below]
    if not weak:
        return None
    return ", ".join(f"{name} (recall {m['recall']:.2f}, {m['support']} test images)" for name, m in weak)


def validation_optimism(manifest: dict, metrics: dict | None) -> list[str]:
    """A limit line when the validation figure the choices were made on is above the test figure."""
    val = (manifest.get("metrics") or {}).get("validation", {}).get("balanced_accuracy")
    test = (metrics or {}).get("balanced_accuracy")
    if val is None or test is None or val <= test:
        return []
    return [
        f"- The epoch, temperature and decision were chosen on the validation split, so its balanced accuracy "
        f"({val:.3f}) is optimistic: on the test split it is {test:.3f}. Expect the test figure on new lesions."
    ]


def headline(metrics: dict | None) -> list[str]:
    if metrics is None:
        return ["No test evaluation was found: run `python -m ml.evaluate` and write the card again."]
    mel, mal = metrics.get("melanoma", {}), metrics.get("malignant", {})
    return [
        f"On the lesion-disjoint test split ({metrics.get('n')} images of {metrics.get('lesions', 'n/a')} lesions), "
        "after temperature scaling:",
        "",
        f"- balanced accuracy: {fmt_ci(metrics.get('balanced_accuracy_ci'))}",
        f"- macro ROC AUC (one-vs-rest): {fmt_ci(metrics.get('macro_auc_ci'))}",
        f"- accuracy {fmt(metrics.get('accuracy'))}, macro F1 {fmt(metrics.get('macro_f1'))}, "
        f"NLL {fmt(metrics.get('nll'))}",
        f"- ECE (15 bins) {fmt(metrics.get('ece'))} after temperature scaling, "
        f"{fmt(metrics.get('ece_uncalibrated'))} before",
        f"- melanoma recall at the shown decision: {fmt_ci(mel.get('recall_at_decision_ci'))}",
        f"- melanoma vs rest: ROC AUC {fmt(mel.get('roc_auc'))}, sensitivity at 80 % specificity "
        f"{fmt_ci(mel.get('sensitivity_at_80_specificity_ci'))}",
        f"- malignant (akiec, bcc, mel) vs benign: ROC AUC {fmt(mal.get('roc_auc'))}",
    ]


def training_lines(manifest: dict, run_args: dict | None) -> list[str]:
    training = manifest.get("training", {})
    init = (run_args or {}).get("init_from")
    start = (
        f"- Initial weights: a warm start from `{init}` as it was when the run began (the version before; "
        "its own training is on its card in `models/archive/`). Epochs below count this run only."
        if init
        else f"- Initial weights: {training.get('weights_init', 'n/a')} (`none` = random initialisation, no ImageNet pretraining)."
    )
    lines = [
        start,
        f"- Epochs run: {training.get('epochs_run')}; weights shipped from epoch {training.get('best_epoch')} "
        f"(best {training.get('monitor')} = {fmt(training.get('best_value'))}); stopped early: {training.get('stopped_early')}.",
        f"- Loss: {training.get('loss')}; class balance: {training.get('balance')}.",
        f"- Calibration: temperature {fmt(manifest.get('temperature'))} fitted on the validation split.",
    ]
    if run_args:
        keys = (
            "img_size",
            "batch_size",
            "epochs",
            "optimizer",
            "schedule",
            "lr",
            "weight_decay",
            "augment",
            "gamma",
            "class_weight_power",
            "dropout",
            "no_augment",
            "monitor",
            "patience",
            "lr_patience",
            "seed",
            "split",
        )
        lines.append("- Arguments: " + ", ".join(f"`{k}={run_args[k]}`" for k in keys if k in run_args) + ".")
    return lines


def decision_lines(manifest: dict) -> list[str]:
    """The decision rule in one sentence, and what it did on validation (where it was chosen)."""
    decision = manifest.get("decision") or {}
    lines = [decision.get("description") or "The top class is the class with the highest probability."]
    by_tau = (manifest.get("decision_fit") or {}).get("by_tau") or {}
    if by_tau and decision.get("tau") is not None:
        chosen = by_tau.get(str(float(decision["tau"]))) or by_tau.get(float(decision["tau"]))
        lines += [
            "",
            f"Validation balanced accuracy: {fmt(by_tau.get('0.0') or by_tau.get(0.0))} with the plain argmax, "
            f"{fmt(chosen)} with tau = {decision['tau']:g} (the best of {len(by_tau)} values from 0 to "
            f"{max(float(t) for t in by_tau):g}). Every count-based figure on this card (accuracy, recall, "
            "balanced accuracy, confusion matrix) is of this decision; AUCs rank the probabilities.",
        ]
    return lines


IMAGE_FEATURES = {"log_probs": "calibrated log-probabilities", "embedding": "pooled 1536-d embedding"}


FUSION_ROWS = (
    ("network alone", "network_alone"),
    ("head with metadata", "with_metadata"),
    ("head without metadata", "head_without_metadata"),
)


def fusion_lines(manifest: dict, extras: dict) -> list[str]:
    """Balanced accuracy with and without metadata (age, sex, site): validation, and test where measured."""
    fusion = manifest.get("fusion")
    if not fusion:
        return []
    features = IMAGE_FEATURES.get(fusion.get("image_features"), "image features")
    lines = [
        "## Metadata (age, sex, anatomical site)",
        "",
        f"A head on the network's {features} plus age, sex and site, trained with metadata blanked for half "
        "of its rows (never `dx_type`), with its own temperature and decision, all chosen on validation. "
        "The portal applies it to a case that has at least one of age, sex and site, and says so beside the "
        "result; a case without any keeps the network's answer.",
        "",
    ]
    test = extras.get("fusion_test")
    if test:
        lines += [
            f"Test split ({test['images']} images of {test['lesions']} lesions, evaluated once):",
            "",
            "| | balanced accuracy | melanoma recall | macro AUC | ECE |",
            "|---|---|---|---|---|",
            *(
                f"| {label} | {fmt_ci(test[key]['balanced_accuracy'])} | {fmt_ci(test[key]['melanoma_recall'])} "
                f"| {fmt(test[key]['macro_auc'])} | {fmt(test[key]['ece'])} |"
                for label, key in FUSION_ROWS
            ),
            "",
        ]
    v = fusion["validation"]
    lines += [
        "Validation balanced accuracy (the head's settings were chosen among six on it, so these are optimistic):",
        "",
        *(f"- {label}: {fmt(v[key]['balanced_accuracy'])}" for label, key in FUSION_ROWS),
        "",
    ]
    return lines


def retrieval_ood_lines(manifest: dict) -> list[str]:
    """The stored embedding for similar cases and the not-dermoscopy detector, where the artifact has them."""
    retrieval, ood = manifest.get("retrieval"), manifest.get("ood")
    lines = []
    if retrieval:
        lines += [
            "## Similar cases",
            "",
            f"Each analysis stores a {retrieval['dims']}-d projection of the network's pooled embedding "
            f"({retrieval['dtype']}, `{retrieval['file']}`). Precision@5 of the label on the test split, prior "
            f"cases from training and validation, no neighbour of the query's own lesion: "
            f"{fmt(retrieval.get('test_precision_at_5'))} (raw embedding {fmt(retrieval.get('test_precision_at_5_raw'))}).",
            "",
        ]
    if ood:
        lines += ood_lines(ood)
    return lines


def ood_lines(ood: dict) -> list[str]:
    """The not-dermoscopy detector: its variant chosen leaving one kind out (`ml.ood_choice`), and
    per kind of generated non-dermoscopic image how many are flagged."""
    from ml.ood import Variant
    from ml.ood_choice import markdown

    if "leave_one_kind_out" not in ood:  # an artifact whose detector was fitted before the choice
        kinds = ", ".join(f"{kind} {k['flagged']}/{k['n']}" for kind, k in ood["flagged_per_kind"].items())
        return ["## Not dermoscopy", "", f"A detector (`{ood['file']}`) flags images unlike dermoscopy: {kinds}.", ""]
    return [
        "## Not dermoscopy",
        "",
        f"A detector (`{ood['file']}`) flags images unlike dermoscopy from the pooled embedding and cheap "
        "statistics of the input image's pixels (`ml.image_stats`: colour, texture, flat area, distinct "
        f"colours); its threshold flags {ood['false_flag_rate_validation']:.0%} of validation images. Its "
        "variant was chosen leaving each kind of generated non-dermoscopic image out in turn "
        '(docs/similar.md): "flagged (left out)" counts the images of a kind that neither trained nor chose '
        "the detector; the shipped variant's own counts are optimistic for the kinds it was chosen on. "
        "`python -m ml.ood_choice --cache /tmp/ham.npz --outlier-cache /tmp/ood.npz --stats-cache "
        "/tmp/stats.npz` prints this table.",
        "",
        markdown(ood["leave_one_kind_out"], ood, Variant(**ood["variant"])),
        "",
    ]


def fullres_lines(extras: dict) -> list[str]:
    agreement = extras.get("fullres")
    if not agreement:
        return []
    return [
        "## Full-resolution images",
        "",
        f"On the {agreement['n']} original 600x450 HAM10000 images provided with the project, resized to the "
        f"input size, the model's top class agrees with its top class on their 200x150 copies for "
        f"{agreement['agree']} of {agreement['n']} ({agreement['agreement']:.1%}); the largest probability difference "
        f"is {agreement['max_probability_difference']:.3f}. Balanced accuracy on the full-resolution images "
        f"{fmt(agreement.get('balanced_accuracy_fullres'))}, on their 200x150 copies "
        f"{fmt(agreement.get('balanced_accuracy_200x150'))} (these images include training images: a consistency "
        "check, not a test).",
        "",
    ]


def best_epoch(history: Path) -> dict | None:
    """The epoch of a run's history.csv with the best validation balanced accuracy of the decision that
    would ship (`val_balanced_accuracy_decided`; runs older than that column: the plain argmax)."""
    if not history.is_file():
        return None
    with history.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    column = "val_balanced_accuracy_decided" if "val_balanced_accuracy_decided" in rows[0] else "val_balanced_accuracy"
    best = max(rows, key=lambda row: float(row[column]))
    return {
        "epochs": len(rows),
        "epoch": int(best["epoch"]),
        "balanced_accuracy": float(best[column]),
        "decided": column.endswith("_decided"),
        "macro_auc": float(best["val_macro_auc"]),
    }


def recipe_lines(compared: list[tuple[Path, str]], findings: list[str]) -> list[str]:
    """The recipe changes tried, each with the best validation figures of its run (`--compare`), and
    other changes measured on validation without a run of their own (`--finding`)."""
    rows = []
    for run, recipe in compared:
        best = best_epoch(run / "history.csv")
        if best is None:
            continue
        decision = "shippable decision" if best["decided"] else "plain argmax"
        rows.append(
            f"| `{run.name}` | {recipe} | {best['epochs']} | {best['epoch']} | "
            f"{best['balanced_accuracy']:.3f} ({decision}) | {best['macro_auc']:.3f} |"
        )
    if not rows and not findings:
        return []
    return [
        "## Recipe changes and their effect on validation",
        "",
        "Each training run changed the recipe; its best epoch by validation balanced accuracy (the plain argmax",
        "for runs made before the shippable decision was tracked per epoch; the decision's own effect is",
        "given above). Chosen on validation only; the test split was not looked at to compare them.",
        "",
        "| run | recipe | epochs run | best epoch | validation balanced accuracy | macro AUC there |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        *[f"- {finding}" for finding in findings],
        *([""] if findings else []),
    ]


def target_status(metrics: dict) -> list[str]:
    """What the card says when a target is not met: which step this is, and that training goes on."""
    unmet = [key for key, (goal, sign) in TARGETS.items() if not _meets(target_value(metrics, key), goal, sign)]
    if not unmet:
        return []
    return [
        f"**Not met: {', '.join(key.replace('_', ' ') for key in unmet)}.** The targets are out of reach in the "
        "CPU training time there has been (2 cores, no GPU, no pretrained weights): this version is the best "
        "step validation chose so far, shipped as such. The run goes on from its committed carry-over (see "
        "Reproduce); a later epoch replaces this version only when its validation figure is clearly above "
        "this version's.",
        "",
    ]


def _meets(value: float | None, goal: float, sign: str) -> bool:
    return value is not None and (value >= goal if sign == ">=" else value <= goal)


def summary_lines(manifest: dict, weights_mb: float) -> list[str]:
    h, w = manifest["input_size"]
    return [
        f"# Model card: {manifest['name']} {manifest['version']}",
        "",
        "**Research use only. Not a medical device and not a diagnosis:** every output of this model is a",
        "research estimate that a qualified clinician must not use for patient care.",
        "",
        "## Summary",
        "",
        f"- Architecture: EfficientNetB3 with a CBAM attention block on the last feature map, 7-way softmax "
        f"({', '.join(manifest['class_names'])}); input {h}x{w} RGB ({manifest.get('preprocessing', '')}).",
        f"- Trained: **{manifest.get('trained')}**, on {manifest.get('trained_on')}.",
        f"- Weights: {manifest.get('weights_dtype', 'float32')}, {weights_mb:.1f} MB; loads and runs on the CPU with TensorFlow.",
        "",
        "## Intended use",
        "",
        "Research on dermoscopic skin-lesion classification and its explanations (Grad-CAM, SHAP) in this",
        "portal: ranking and reviewing cases, comparing model versions, studying failure modes. Out of scope:",
        "any clinical decision, screening of patients, non-dermoscopic (clinical or smartphone) photographs,",
        "lesions outside the seven HAM10000 diagnoses.",
        "",
    ]


def results_lines(manifest: dict, metrics: dict | None) -> list[str]:
    lines = ["## Test results", "", *headline(metrics), ""]
    if metrics is None:
        return lines
    return lines + [
        "| target (issue 18) | reached | goal | |",
        "| --- | --- | --- | --- |",
        *target_rows(metrics),
        "",
        *target_status(metrics),
        "| class | test images | recall | precision | ROC AUC |",
        "| --- | --- | --- | --- | --- |",
        *per_class_rows(metrics, manifest.get("class_long_names", {})),
        "",
    ]


def data_lines(manifest: dict) -> list[str]:
    split = manifest.get("split", {})
    lines = [
        "## Training data and split",
        "",
        f"{manifest.get('trained_on')}. Split by `lesion_id` (no lesion in two parts), stratified by diagnosis, "
        f"seed {split.get('seed')}; the per-image assignment is in `split.csv`.",
        "",
    ]
    if split_rows(split):
        lines += ["| part | images | lesions | per class |", "| --- | --- | --- | --- |", *split_rows(split), ""]
    return lines


def limits_lines(manifest: dict, metrics: dict | None) -> list[str]:
    h, w = manifest["input_size"]
    weak = weak_classes(metrics)
    return [
        "## Known limits",
        "",
        *validation_optimism(manifest, metrics),
        f"- Low resolution: {h}x{w} from 200x150 downscales; fine structures (dots, globules, vessels) are largely lost.",
        "- No ImageNet pretraining (weights could not be downloaded) and training on 2 CPU cores only: the",
        "  model is far from what the architecture reaches with pretraining (see the targets above).",
        "- HAM10000 comes from two sites (Vienna, Queensland) and mostly fair skin (Fitzpatrick I-III); darker",
        "  skin types are under-represented, and performance on them is unknown.",
        "- Rare classes (df, vasc, akiec) have few test images: their per-class figures have wide intervals.",
        *([f"- Classes this model rarely finds on the test split: {weak}."] if weak else []),
        "- Test images come from the same distribution as training (no external validation, no prospective study).",
        "",
    ]


def render(
    manifest: dict,
    metrics: dict | None,
    run_args: dict | None,
    commands: list[str],
    weights_mb: float,
    artifact_extras: dict | None = None,
    compared: list[tuple[Path, str]] | None = None,
    findings: list[str] | None = None,
) -> str:
    artifact_extras = artifact_extras or {}
    lines = [
        *summary_lines(manifest, weights_mb),
        *results_lines(manifest, metrics),
        "## How the top class is chosen",
        "",
        *decision_lines(manifest),
        "",
        *fusion_lines(manifest, artifact_extras),
        *retrieval_ood_lines(manifest),
        *fullres_lines(artifact_extras),
        *data_lines(manifest),
        "## Training",
        "",
        *training_lines(manifest, run_args),
        "",
        *recipe_lines(compared or [], findings or []),
        "## Reproduce",
        "",
        "```",
        *commands,
        "```",
        "",
        *limits_lines(manifest, metrics),
        "## Next steps to a better model",
        "",
        NEXT_STEPS,
        "## Licence and citation",
        "",
        "Trained on HAM10000 (CC BY-NC 4.0); the weights carry the same licence. See `LICENSE-DATA.md`.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    artifact: Path,
    eval_dir: Path | None = None,
    run_dir: Path | None = None,
    commands: list[str] | None = None,
    compared: list[tuple[Path, str]] | None = None,
    findings: list[str] | None = None,
) -> Path:
    """Writes MODEL_CARD.md (and LICENSE-DATA.md) into `artifact`; returns the card's path.

    Raises:
        FileNotFoundError: if the artifact has no manifest.json.
    """
    manifest = load_json(artifact / "manifest.json")
    if manifest is None:
        raise FileNotFoundError(f"{artifact} has no manifest.json.")
    metrics = load_json((eval_dir or artifact / "eval_test") / "metrics.json")
    run_args = load_json(run_dir / "args.json") if run_dir else None
    weights_mb = sum(p.stat().st_size for p in artifact.glob("*.h5")) / 1024 / 1024
    card = artifact / "MODEL_CARD.md"
    extras = {
        "fullres": load_json(artifact / "eval_fullres" / "agreement.json"),
        "fusion_test": load_json(artifact / "eval_test" / "fusion.json"),
    }
    card.write_text(render(manifest, metrics, run_args, commands or [], weights_mb, extras, compared, findings))
    (artifact / "LICENSE-DATA.md").write_text(HAM10000_LICENCE)
    return card


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ml.model_card", description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", required=True, type=Path, help="artifact folder (manifest.json + weights)")
    parser.add_argument("--eval", type=Path, help="the test evaluation folder (default ARTIFACT/eval_test)")
    parser.add_argument("--run", type=Path, help="the training run folder, for its args.json")
    parser.add_argument(
        "--command", action="append", default=[], help="a command that reproduces the artifact (repeatable)"
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="RUN=RECIPE",
        help="a training run folder and what its recipe changed, for the card's recipe table (repeatable)",
    )
    parser.add_argument(
        "--finding", action="append", default=[], help="another change measured on validation, in one sentence"
    )
    args = parser.parse_args(argv)
    compared = [(Path(run), recipe) for run, _, recipe in (c.partition("=") for c in args.compare)]
    print(f"Wrote {write_model_card(args.artifact, args.eval, args.run, args.command, compared, args.finding)}")


if __name__ == "__main__":
    main()
