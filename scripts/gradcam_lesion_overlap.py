"""How much Grad-CAM energy falls inside the segmented lesion, against the lesion's share of the image.

    python scripts/gradcam_lesion_overlap.py --model models/default --n 50
    python scripts/gradcam_lesion_overlap.py --model untrained --n 30      # a sanity run

For a seeded sample of HAM10000 images that have a segmentation (`masks/<id>_segmentation.png`),
computes the Grad-CAM map of the predicted class (or `--class`) at the image's size and reports per
image and on average: `gradcam_in_lesion` (share of the map's sum inside the mask), `lesion_area`
(the mask's share of the image; what a map blind to the lesion would score), their ratio, and
whether the map's peak lies in the lesion (pointing game). A map that is all zero has no share and
is counted in `zero_maps`. Prints one JSON document (also written to `--out` if given).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_DATA = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ham10000-200x150"
)  # ../shared beside the repo


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model artifact folder, or 'untrained'")
    p.add_argument("--n", type=int, default=50, help="number of images to sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder with images/ and masks/")
    p.add_argument("--class", dest="class_name", default=None, help="explain this class instead of the predicted one")
    p.add_argument("--plus-plus", action="store_true", help="Grad-CAM++")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return p.parse_args(argv)


def sample_ids(data_dir: Path, n: int, seed: int) -> list[str]:
    """A seeded sample of image ids that have both an image and a lesion mask."""
    masks = {p.name[: -len("_segmentation.png")] for p in (data_dir / "masks").glob("*_segmentation.png")}
    ids = sorted(p.stem for p in (data_dir / "images").glob("*.jpg") if p.stem in masks)
    if not ids:
        raise SystemExit(f"No image with a mask under {data_dir}.")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(ids, size=min(n, len(ids)), replace=False).tolist())


def read_pair(data_dir: Path, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    with Image.open(data_dir / "images" / f"{image_id}.jpg") as im:
        image = np.asarray(im.convert("RGB"))
    with Image.open(data_dir / "masks" / f"{image_id}_segmentation.png") as m:
        mask = np.asarray(m.convert("L")) > 127
    if mask.shape != image.shape[:2]:
        raise SystemExit(f"Mask of {image_id} is {mask.shape}, its image {image.shape[:2]}.")
    return image, mask


def overlap_rows(predictor, data_dir: Path, ids: list[str], args) -> list[dict]:
    from ml.explain import explain_gradcam
    from ml.explain.metrics import energy_inside, peak_inside

    rows = []
    for start in range(0, len(ids), args.batch_size):
        chunk = ids[start : start + args.batch_size]
        pairs = [read_pair(data_dir, image_id) for image_id in chunk]
        result = explain_gradcam(predictor, [p[0] for p in pairs], args.class_name, plus_plus=args.plus_plus)
        for image_id, (_, mask), heat, probs, cls in zip(chunk, pairs, result.maps, result.probs, result.class_indices):
            inside, area = energy_inside(heat, mask), float(mask.mean())
            rows.append(
                {
                    "image_id": image_id,
                    "explained_class": predictor.class_names[int(cls)],
                    "probability": round(float(probs[int(cls)]), 4),
                    "gradcam_in_lesion": None if inside is None else round(inside, 4),
                    "lesion_area": round(area, 4),
                    "ratio": None if inside is None or area == 0 else round(inside / area, 3),
                    "peak_in_lesion": None if inside is None else peak_inside(heat, mask),
                }
            )
    return rows


def summarise(rows: list[dict]) -> dict:
    valid = [r for r in rows if r["gradcam_in_lesion"] is not None]
    mean = lambda key, rs: round(float(np.mean([r[key] for r in rs])), 4) if rs else None  # noqa: E731
    return {
        "n": len(rows),
        "zero_maps": len(rows) - len(valid),
        "mean_gradcam_in_lesion": mean("gradcam_in_lesion", valid),
        "mean_lesion_area": mean("lesion_area", valid),
        "mean_ratio": mean("ratio", [r for r in valid if r["ratio"] is not None]),
        "share_above_area": round(float(np.mean([r["gradcam_in_lesion"] > r["lesion_area"] for r in valid])), 4)
        if valid
        else None,
        "pointing_game": round(float(np.mean([r["peak_in_lesion"] for r in valid])), 4) if valid else None,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    from ml.explain.cli import load_predictor

    predictor = load_predictor(args.model)
    ids = sample_ids(args.data_dir, args.n, args.seed)
    rows = overlap_rows(predictor, args.data_dir, ids, args)
    report = {
        "model": args.model,
        "model_version": predictor.manifest.get("version"),
        "input_size": list(predictor.manifest.get("input_size", [])),
        "gradcam_layer": predictor.gradcam_layer,
        "plus_plus": args.plus_plus,
        "class": args.class_name or "predicted",
        "seed": args.seed,
        "mean": summarise(rows),
        "per_image": rows,
    }
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
