"""Figures (matplotlib, Agg backend) and the Markdown report of an evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
from numpy.typing import ArrayLike  # noqa: E402

matplotlib.use("Agg")  # no display on servers and in workers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from ml.metrics import expected_calibration_error, reliability_bins  # noqa: E402


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def plot_confusion_matrices(confusion: ArrayLike, class_names: Sequence[str], path: Path) -> str:
    """Counts and row-normalised (recall) confusion matrices side by side."""
    cm = np.asarray(confusion, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    normalised = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, matrix, title, fmt in (
        (axes[0], cm, "Counts", "{:.0f}"),
        (axes[1], normalised, "Row-normalised (recall)", "{:.2f}"),
    ):
        im = ax.imshow(matrix, cmap="Blues", vmin=0)
        ax.set(
            xticks=range(len(class_names)),
            yticks=range(len(class_names)),
            xticklabels=class_names,
            yticklabels=class_names,
            xlabel="Predicted",
            ylabel="True",
            title=title,
        )
        high = matrix.max() / 2 if matrix.max() else 0.5
        for i in range(len(class_names)):
            for j in range(len(class_names)):
                ax.text(
                    j,
                    i,
                    fmt.format(matrix[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if matrix[i, j] > high else "black",
                )
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_roc_curves(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: Path) -> str:
    """One-vs-rest ROC curve of every class that has positives and negatives."""
    fig, ax = plt.subplots(figsize=(6, 6))
    for c, name in enumerate(class_names):
        positive = np.asarray(y_true) == c
        if positive.any() and not positive.all():
            fpr, tpr, _ = roc_curve(positive, probs[:, c])
            ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.axvline(0.2, color="grey", linestyle=":", linewidth=0.8, label="specificity 0.8")
    ax.set(xlabel="1 - specificity", ylabel="Sensitivity", title="ROC (one vs rest)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_reliability(
    y_true: np.ndarray, probs_before: np.ndarray, probs_after: np.ndarray, path: Path, n_bins: int = 15
) -> str:
    """Reliability diagrams of the top-label confidence before and after temperature scaling."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, probs, title in (
        (axes[0], probs_before, "Before calibration"),
        (axes[1], probs_after, "After temperature scaling"),
    ):
        bins = reliability_bins(y_true, probs, n_bins)
        edges = np.asarray(bins["edges"])
        centres = (edges[:-1] + edges[1:]) / 2
        acc = np.array([a if a is not None else np.nan for a in bins["accuracy"]])
        ax.bar(centres, np.nan_to_num(acc), width=1 / n_bins, edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfect calibration")
        ece = expected_calibration_error(y_true, probs, n_bins)
        ax.set(xlabel="Confidence", ylabel="Accuracy", title=f"{title} (ECE {ece:.3f})", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_confidence_histogram(probs_before: np.ndarray, probs_after: np.ndarray, path: Path) -> str:
    """Distribution of the top-label confidence before and after calibration."""
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 26)
    ax.hist(np.max(probs_before, axis=1), bins=bins, alpha=0.5, label="uncalibrated")
    ax.hist(np.max(probs_after, axis=1), bins=bins, alpha=0.5, label="calibrated")
    ax.set(xlabel="Top-class probability", ylabel="Images", title="Confidence")
    ax.legend()
    return _save(fig, path)


def _fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ci(ci: dict | None) -> str:
    if not ci or ci.get("low") is None:
        return ""
    return f" (95% CI {_fmt(ci['low'])}-{_fmt(ci['high'])})"


def write_report(out_dir: Path, metrics: dict, figures: dict, class_names: Sequence[str]) -> Path:
    """report.md: headline numbers, per-class table, operating points and the figures."""
    m = metrics
    mel, mal = m["melanoma"], m["malignant"]
    lines = [
        f"# Evaluation of {m['model']['name']} {m['model']['version']}",
        "",
        f"Data: `{m['data']}`, split `{m['split']}`, {m['n']} images of {m['lesions']} lesions"
        f"{', test-time augmentation (flips)' if m['tta'] else ''}. Temperature {m['temperature']:.3f}.",
        "Research use only; not a diagnostic device.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| accuracy | {_fmt(m['accuracy'])} |",
        f"| balanced accuracy | {_fmt(m['balanced_accuracy'])}{_ci(m.get('balanced_accuracy_ci'))} |",
        f"| macro F1 | {_fmt(m['macro_f1'])} |",
        f"| macro AUC | {_fmt(m['macro_auc'])}{_ci(m.get('macro_auc_ci'))} |",
        f"| ECE (calibrated / uncalibrated) | {_fmt(m['ece'])} / {_fmt(m['ece_uncalibrated'])} |",
        f"| melanoma sensitivity at 80% specificity | {_fmt(mel['sensitivity_at_80_specificity'])}{_ci(mel.get('sensitivity_at_80_specificity_ci'))} |",
        f"| melanoma AUC | {_fmt(mel['roc_auc'])} |",
        f"| benign/malignant AUC | {_fmt(mal['roc_auc'])} |",
        f"| malignant sensitivity / specificity at threshold {_fmt(mal['at_threshold']['threshold'])} "
        f"| {_fmt(mal['at_threshold']['sensitivity'])} / {_fmt(mal['at_threshold']['specificity'])} |",
        f"| melanoma sensitivity / specificity at threshold {_fmt(mel['at_threshold']['threshold'])} "
        f"| {_fmt(mel['at_threshold']['sensitivity'])} / {_fmt(mel['at_threshold']['specificity'])} |",
        "",
        "Confidence intervals: percentile bootstrap, resampling lesions. Thresholds were chosen on the validation split.",
        "",
        "## Per class",
        "",
        "| class | support | precision | recall | F1 | ROC AUC | PR AUC |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in class_names:
        c = m["per_class"][name]
        lines.append(
            f"| {name} | {c['support']} | {_fmt(c['precision'])} | {_fmt(c['recall'])} | {_fmt(c['f1'])} "
            f"| {_fmt(c['roc_auc'])} | {_fmt(c['pr_auc'])} |"
        )
    lines += ["", "## Figures", ""]
    for title, file in figures.items():
        lines += [f"### {title}", "", f"![{title}]({file})", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
