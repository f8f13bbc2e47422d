"""`python -m ml.export --run runs/NAME --out models/NAME [--float16]`: ship a run as an artifact."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from ml.artifact import export_artifact
from ml.predictor import Predictor


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ml.export", description=__doc__)
    parser.add_argument("--run", required=True, help="finished training run folder (has manifest.json)")
    parser.add_argument("--out", required=True, help="artifact folder to create, e.g. models/NAME")
    parser.add_argument("--float16", action="store_true", help="store the weights as float16 (half the size)")
    parser.add_argument("--check", action="store_true", help="load the export and compare outputs with the run")
    args = parser.parse_args(argv)
    out = export_artifact(args.run, args.out, float16=args.float16)
    print(f"Exported {args.run} to {out}{' (float16 weights)' if args.float16 else ''}.")
    if args.check:
        _check_export(args.run, out)


def _check_export(run, out) -> None:
    """Both folders must give (nearly) the same probabilities on random images."""

    a, b = Predictor.load(run), Predictor.load(out)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (150, 200, 3), dtype=np.uint8) for _ in range(4)]
    diff = float(np.abs(a.predict(images) - b.predict(images)).max())
    print(f"Largest probability difference between run and export: {diff:.2e}")


if __name__ == "__main__":
    main()
