"""Which variant of the out-of-distribution detector to ship, chosen without the kind it is judged on.

A variant (`ml.ood.Variant`: how many PCA coordinates the regression sees beside the embedding's
four signals and the image statistics, how strongly it is regularised) picked by its flag counts on the evaluation set would be judged on
the images that picked it. Here each kind of non-dermoscopic image (`ml.outliers.EVALUATION_KINDS`)
is left out in turn:

1. every variant is fitted with outlier exposure from the training kinds other than the left-out
   one, its threshold fixed on the validation split (at most 5 % of real dermoscopy flagged);
2. the variant that flags the largest share of the other kinds that this fit never trained on
   (each kind weighing the same; ties go to fewer coordinates, then stronger regularisation) is
   chosen;
3. its flagged share of the left-out kind is the honest figure for a kind nobody has tried.

The shipped variant is chosen by the same rule with no kind left out (trained on all training
kinds, chosen on all the others); its per-kind counts are therefore optimistic for the kinds it
was chosen on, which the leave-one-kind-out figures are not.

    python -m ml.ood_choice --cache /tmp/ham.npz --outlier-cache /tmp/ood.npz --stats-cache /tmp/stats.npz [--write]

prints both tables (Markdown, then the JSON), and with --write stores the chosen variant's
detector in the artifact (`ml.ood.write`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from ml.ood import (
    Inputs,
    OodDetector,
    Variant,
    arguments,
    evaluate,
    fit_statistics,
    inputs,
    with_regression,
    write,
)
from ml.outliers import EVALUATION_KINDS, TRAINING_KINDS

VARIANTS = tuple(Variant(c, r) for c in (0, 16, 64) for r in (0.01, 0.1, 1.0))


class Signals:
    """Every set's signals under one set of statistics (all PCA coordinates): a variant's fit only
    selects columns, so the embeddings are turned into signals once."""

    def __init__(self, base: OodDetector, real: dict[str, Inputs], outliers: dict[str, Inputs]):
        self.base = base
        self.real = {split: base.signals(*x) for split, x in real.items()}
        self.outliers = {name: base.signals(*x) for name, x in outliers.items()}

    def fit(self, variant: Variant, training_kinds: Sequence[str]) -> OodDetector:
        exposure = np.concatenate([self.outliers[f"train/{k}"] for k in training_kinds])
        return with_regression(self.base, self.real["train"], exposure, self.real["val"], variant)

    def flagged_share(self, detector: OodDetector, kind: str) -> float:
        return float(detector.flagged(detector.score_signals(self.outliers[f"eval/{kind}"])).mean())


def choose(signals: Signals, training_kinds: Sequence[str], selection_kinds: Sequence[str]) -> tuple[Variant, dict]:
    """The variant flagging the largest mean share of `selection_kinds`, fitted on `training_kinds`;
    also each variant's mean share."""
    shares = {}
    for variant in VARIANTS:
        detector = signals.fit(variant, training_kinds)
        shares[variant] = float(np.mean([signals.flagged_share(detector, k) for k in selection_kinds]))
    # Rounded: equal flag counts are a tie, whatever the float sums' last bits say.
    best = max(VARIANTS, key=lambda v: (round(shares[v], 9), -v.coordinates, -v.regularisation))
    return best, {str(v): round(s, 4) for v, s in shares.items()}


def leave_one_kind_out(signals: Signals) -> dict:
    """Per evaluation kind: the variant chosen without it, and that variant's flagged share of it."""
    out = {}
    for kind in EVALUATION_KINDS:
        training = [k for k in TRAINING_KINDS if k != kind]
        selection = [k for k in EVALUATION_KINDS if k != kind and k not in training]
        variant, _ = choose(signals, training, selection)
        detector = signals.fit(variant, training)
        n = len(signals.outliers[f"eval/{kind}"])
        share = signals.flagged_share(detector, kind)
        out[kind] = {"variant": asdict(variant), "flagged": round(share * n), "n": n, "chosen_on": selection}
    return out


def markdown(loko: dict, report: dict, chosen: Variant) -> str:
    """The two tables docs/similar.md shows."""
    lines = [
        "| kind | variant chosen without it | flagged (left out) | flagged by the shipped variant | trained on the kind |",
        "|---|---|---|---|---|",
    ]
    for kind, row in loko.items():
        shipped = report["flagged_per_kind"][kind]
        lines.append(
            f"| {kind} | {Variant(**row['variant'])} | {row['flagged']} / {row['n']} | "
            f"{shipped['flagged']} / {shipped['n']} | {'yes' if shipped['in_training'] else 'no'} |"
        )
    left_out = sum(r["flagged"] for r in loko.values()) / sum(r["n"] for r in loko.values())
    lines += [
        "",
        f"Left out, all kinds: {left_out:.1%} flagged. Shipped variant: {chosen}; test dermoscopy flagged "
        f"{report['test_dermoscopy_flagged']:.1%}; AUROC {report['auroc_all_kinds']:.3f} on all kinds, "
        f"{report['auroc_held_out_kinds']:.3f} on the kinds never trained on.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = arguments("Choose the detector's variant leaving one kind out; measure the choice.").parse_args(argv)
    real, y, outliers, head, size = inputs(args)
    signals = Signals(fit_statistics(real["train"].embeddings, y, head, head[0].shape[1], size), real, outliers)
    loko = leave_one_kind_out(signals)
    held_out = [k for k in EVALUATION_KINDS if k not in TRAINING_KINDS]
    chosen, shares = choose(signals, TRAINING_KINDS, held_out)
    detector = signals.fit(chosen, TRAINING_KINDS)
    report = {
        "variant": asdict(chosen),
        **evaluate(detector, real["test"], outliers),
        "leave_one_kind_out": loko,
        "mean_flagged_share_per_variant": shares,
    }
    print(markdown(loko, report, chosen))
    print(json.dumps(report, indent=2))
    if args.write:
        write(args.model, detector, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
