"""Writes the out-of-distribution image set (not dermoscopy) to PNG files, offline, from a seed.

    python scripts/make_ood_set.py --out ood-set [--per-kind 40] [--seed 2] [--data ../shared/data/ham10000-200x150]

One folder per kind (ml.outliers.GENERATED: photo, document, chart, xray, noise, flat, shapes,
gradient, blurred, and with --data the lesion masks and lesion-free skin crops of the artifact's
test split), plus `index.csv`
(path,kind). The recipe is the code in ml/outliers.py: the same seed gives the same images.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ml import data as D  # noqa: E402
from ml import outliers  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--per-kind", type=int, default=40)
    parser.add_argument("--seed", type=int, default=2, help="evaluation seed (ml.ood trains on seed 1)")
    parser.add_argument("--data", help="HAM10000 folder with images/ and masks/: adds the mask and skin kinds")
    parser.add_argument("--split", default="models/default/split.csv", help="whose test split the HAM kinds use")
    args = parser.parse_args(argv)
    sets = {kind: outliers.generate(kind, args.per_kind, args.seed) for kind in outliers.GENERATED}
    if args.data:
        table = D.apply_split(D.read_dataset(args.data), args.split)
        test_paths = list(table.loc[table["split"] == "test", "path"])
        for kind in outliers.FROM_HAM10000:
            sets[kind] = outliers.ham_outliers(test_paths, kind, args.per_kind, args.seed)
    rows = []
    for kind, images in sets.items():
        folder = args.out / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            path = folder / f"{kind}_{i:03d}.png"
            cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            rows.append((str(path.relative_to(args.out)), kind))
    with open(args.out / "index.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "kind"), *rows])
    print(f"Wrote {len(rows)} images of {len(sets)} kinds to {args.out}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
