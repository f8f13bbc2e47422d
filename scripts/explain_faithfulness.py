"""Which explanation is faithful to the model: deletion curves and lesion overlap on validation images.

    python scripts/explain_faithfulness.py --model models/default --n 40

For a seeded sample of validation images (the model's lesion-grouped split, `split.csv` in the
artifact; one image per lesion, each with a HAM10000 lesion mask), at the model's input size and
for the class the portal shows (the model's decision):

- `deletion_auc`: area under the deletion curve (`ml.explain.faithfulness`): the class probability
  as the most attributed pixels are replaced by the blurred image, 0 to 100 % in `--steps` steps.
  Lower is more faithful. `random` (a map of noise) is the reference a map must beat.
- `lesion_top_share`: share of the map's top pixels, as many as the lesion has, inside the lesion
  mask (`ml.explain.metrics.top_share_inside`); a map blind to the lesion scores `lesion_area`.

Maps: `shap_blocks` (shap's axis-aligned partition), `shap_superpixels` (SLIC regions), both at
`--max-evals` evaluations with the blur baseline, `gradcam` (the served map: the forward class
activation map where it equals Grad-CAM) and `random`. SHAP maps are cached under `--cache`
(keyed by model version, image, variant and settings), so a rerun costs only the deletion curves.
`delta_vs_shap_blocks` is the paired mean difference of deletion AUC with a 95 % interval (normal
approximation). Prints a table and writes the JSON to `--out` (bench-out/faithfulness.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ham10000-200x150"  # ../shared beside the repo
SHAP_VARIANTS = {"shap_blocks": "blocks", "shap_superpixels": "superpixels"}
METHODS = ("shap_blocks", "shap_superpixels", "gradcam", "random")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "models/default"), help="model artifact folder (with split.csv)")
    p.add_argument("--n", type=int, default=40, help="validation images (one per lesion)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder with images/ and masks/")
    p.add_argument("--max-evals", type=int, default=500)
    p.add_argument("--n-segments", type=int, default=None, help="superpixels per image (default: the served setting)")
    p.add_argument("--steps", type=int, default=16, help="deletion steps from 0 to 100 %% of the pixels")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--cache", type=Path, default=Path("/tmp/explain-faithfulness"), help="SHAP map cache folder")
    p.add_argument("--out", type=Path, default=ROOT / "bench-out" / "faithfulness.json")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    return args


def sample_ids(model_dir: Path, data_dir: Path, n: int, seed: int) -> list[str]:
    """A seeded sample of validation images, one per lesion, that have a lesion mask."""
    import pandas as pd

    split_csv = model_dir / "split.csv"
    if not split_csv.is_file():
        raise SystemExit(f"{split_csv} is missing: the sample is drawn from the model's validation split.")
    table = pd.read_csv(split_csv)
    masks = {p.name[: -len("_segmentation.png")] for p in (data_dir / "masks").glob("*_segmentation.png")}
    val = table[(table["split"] == "val") & table["image_id"].isin(masks)].sort_values("image_id")
    one_per_lesion = val.drop_duplicates("lesion_id")["image_id"].to_numpy()
    if not len(one_per_lesion):
        raise SystemExit(f"No validation image with a mask under {data_dir}.")
    # a seeded order of all of them: a smaller --n takes a prefix of a larger one (and its cache)
    return np.random.default_rng(seed).permutation(one_per_lesion)[:n].tolist()


def read_pair(predictor, data_dir: Path, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """The image at the model's input size (uint8; `preprocess` resizes and returns whole numbers
    as float32) and its lesion mask at the same size."""
    import cv2
    from PIL import Image

    with Image.open(data_dir / "images" / f"{image_id}.jpg") as im:
        image = predictor.preprocess(np.asarray(im.convert("RGB"))).astype(np.uint8)
    with Image.open(data_dir / "masks" / f"{image_id}_segmentation.png") as m:
        mask = np.asarray(m.convert("L")) > 127
    h, w = image.shape[:2]
    return image, cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0


def cached_shap(fn, image, class_index, probs, regions, args, key: str) -> tuple[np.ndarray, float | None]:
    """(map, CPU seconds or None when read from the cache) of one SHAP variant."""
    from ml.explain.shap_explainer import shap_values

    path = args.cache / f"{key}.npy"
    if path.is_file():
        return np.load(path), None
    start = time.process_time()
    result = shap_values(
        fn,
        image,
        class_indices=[class_index],
        max_evals=args.max_evals,
        probs=probs,
        regions=regions,
        **({"n_segments": args.n_segments} if args.n_segments else {}),
    )
    cpu = time.process_time() - start
    args.cache.mkdir(parents=True, exist_ok=True)
    np.save(path, result.values[0])
    return result.values[0], cpu


def image_rows(predictor, image_id: str, args) -> list[dict]:
    from ml.explain import explain_gradcam, probability_function
    from ml.explain.faithfulness import deletion_auc, deletion_curve
    from ml.explain.gradcam import predictor_temperature
    from ml.explain.metrics import top_share_inside
    from ml.explain.shap_explainer import N_SEGMENTS, blurred

    image, mask = read_pair(predictor, args.data_dir, image_id)
    cam = explain_gradcam(predictor, [image])  # the decision's class, its map at the input size
    cls, probs = int(cam.class_indices[0]), cam.probs[0]
    fn = probability_function(predictor.model, predictor_temperature(predictor))
    image = image.astype(np.float32)
    baseline = blurred(image)
    version = predictor.manifest.get("version", "model")
    rows = []
    for method in args.methods:
        cpu = None
        if method in SHAP_VARIANTS:
            segments = args.n_segments or N_SEGMENTS
            key = f"{version}-{image_id}-{method}-{args.max_evals}-{segments if method == 'shap_superpixels' else ''}-{cls}"
            values, cpu = cached_shap(fn, image, cls, probs, SHAP_VARIANTS[method], args, key)
        elif method == "gradcam":
            values = cam.maps[0]
        else:
            values = np.random.default_rng(args.seed).random(image.shape[:2])
        curve = deletion_curve(fn, image, values, cls, baseline, steps=args.steps)
        rows.append(
            {
                "image_id": image_id,
                "method": method,
                "class": predictor.class_names[cls],
                "probability": round(float(probs[cls]), 4),
                "deletion_auc": round(deletion_auc(curve), 4),
                "deletion_curve": [round(float(p), 4) for p in curve],
                "lesion_top_share": round(top_share_inside(values, mask), 4),
                "lesion_area": round(float(mask.mean()), 4),
                "shap_cpu_s": None if cpu is None else round(cpu, 2),
            }
        )
    return rows


def summarise(rows: list[dict], methods: list[str]) -> dict:
    by = {m: {r["image_id"]: r for r in rows if r["method"] == m} for m in methods}
    summary = {}
    for method in methods:
        mine = list(by[method].values())
        auc = np.array([r["deletion_auc"] for r in mine])
        cpu = [r["shap_cpu_s"] for r in mine if r["shap_cpu_s"] is not None]
        entry = {
            "n": len(mine),
            "deletion_auc": round(float(auc.mean()), 4),
            "deletion_auc_sd": round(float(auc.std(ddof=1)), 4) if len(auc) > 1 else None,
            "lesion_top_share": round(float(np.mean([r["lesion_top_share"] for r in mine])), 4),
            "lesion_area": round(float(np.mean([r["lesion_area"] for r in mine])), 4),
            "shap_cpu_s_mean": round(float(np.mean(cpu)), 2) if cpu else None,
        }
        if "shap_blocks" in by and method != "shap_blocks":
            diff = np.array([by[method][i]["deletion_auc"] - by["shap_blocks"][i]["deletion_auc"] for i in by[method]])
            half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
            entry["delta_vs_shap_blocks"] = round(float(diff.mean()), 4)
            entry["delta_ci95"] = [round(float(diff.mean() - half), 4), round(float(diff.mean() + half), 4)]
            entry["lower_than_shap_blocks"] = round(float(np.mean(diff < 0)), 3)
        summary[method] = entry
    return summary


def table(summary: dict) -> str:
    lines = [
        "| map | n | deletion AUC (lower is better) | vs SHAP blocks (95 % CI) | lower on | top pixels in lesion | lesion area |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, s in summary.items():
        delta = (
            f"{s['delta_vs_shap_blocks']:+.4f} [{s['delta_ci95'][0]:+.4f}, {s['delta_ci95'][1]:+.4f}]"
            if "delta_vs_shap_blocks" in s
            else ""
        )
        lower = f"{s['lower_than_shap_blocks']:.0%}" if "lower_than_shap_blocks" in s else ""
        lines.append(
            f"| {method} | {s['n']} | {s['deletion_auc']:.4f} | {delta} | {lower} "
            f"| {s['lesion_top_share']:.3f} | {s['lesion_area']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    from ml import Predictor

    predictor = Predictor.load(args.model)
    ids = sample_ids(Path(args.model), args.data_dir, args.n, args.seed)
    rows = []
    for i, image_id in enumerate(ids, 1):
        rows.extend(image_rows(predictor, image_id, args))
        print(f"{i}/{len(ids)} {image_id}", file=sys.stderr, flush=True)
    summary = summarise(rows, args.methods)
    from ml.explain.shap_explainer import N_SEGMENTS

    report = {
        "model": args.model,
        "model_version": predictor.manifest.get("version"),
        "input_size": list(predictor.input_size),
        "sample": f"{len(ids)} validation images, one per lesion, seed {args.seed}",
        "max_evals": args.max_evals,
        "n_segments": args.n_segments or N_SEGMENTS,
        "deletion_steps": args.steps,
        "baseline": "box blur (ml.explain.shap_explainer.default_blur), as SHAP's masker",
        "summary": summary,
        "per_image": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(table(summary))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
