"""`python -m ml.explain`: overlays and raw maps for a folder of images.

For each image `X.jpg` (or .jpeg/.png) in `--images`, writes `OUT/X.png` (the overlay, at the
image's size unless `--colorbar`) and `OUT/X.npy` (the raw 2-D map at the image's height and width:
Grad-CAM in [0, 1], or the SHAP values of the explained class), plus `OUT/summary.json` with the
explained class and the calibrated probabilities of every image.

    python -m ml.explain --model models/default --images samples/ --method gradcam --out out/
    UNTRAINED_INPUT_SIZE=64,64 python -m ml.explain --model untrained --images samples/ --out out/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ml.explain import gradcam, overlay, shap_explainer
from ml.predictor import Predictor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ml.explain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model artifact folder, or 'untrained'")
    parser.add_argument("--images", required=True, type=Path, help="folder of .jpg/.jpeg/.png images")
    parser.add_argument("--method", choices=("gradcam", "shap"), default="gradcam")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--class", dest="class_name", default=None, help="class to explain (default: predicted)")
    parser.add_argument("--max-evals", type=int, default=500, help="SHAP model evaluations per image")
    parser.add_argument("--batch-size", type=int, default=64, help="SHAP masked images per model call")
    parser.add_argument("--plus-plus", action="store_true", help="Grad-CAM++ instead of Grad-CAM")
    parser.add_argument("--cmap", default=overlay.GRADCAM_CMAP, help="Grad-CAM colour map (inferno, viridis, ...)")
    parser.add_argument("--alpha", type=float, default=0.8, help="overlay opacity where the map is strongest")
    parser.add_argument("--colorbar", action="store_true", help="draw a colour bar next to each overlay")
    return parser


def load_predictor(spec: str) -> Predictor:
    """`Predictor.load(spec)`, or for 'untrained' the seeded untrained model whose input size comes
    from UNTRAINED_INPUT_SIZE ("H,W"), as the worker builds it (`Predictor.load_default(None)`)."""
    if spec == "untrained":
        return Predictor.load_default(None)
    return Predictor.load(spec)


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder, sorted by name.

    Raises:
        ValueError: if the folder is missing, has no images, or two images share a stem.
    """
    if not folder.is_dir():
        raise ValueError(f"Image folder {str(folder)!r} does not exist.")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"Image folder {str(folder)!r} has no {'/'.join(IMAGE_SUFFIXES)} files.")
    stems = [p.stem for p in paths]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise ValueError(f"Images {duplicates} share a name with another image; their outputs would collide.")
    return paths


def read_rgb(path: Path) -> np.ndarray:
    """A file as an HxWx3 uint8 RGB array, EXIF orientation applied."""
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def _check_args(args, class_names) -> None:
    if args.class_name is not None and args.class_name not in class_names:
        raise ValueError(f"Unknown class {args.class_name!r}; this model's classes are {list(class_names)}.")
    if args.max_evals < 10:
        raise ValueError(f"--max-evals must be at least 10, got {args.max_evals}.")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be between 0 and 1, got {args.alpha}.")


def _gradcam_outputs(predictor, image, args):
    result = gradcam.explain_gradcam(predictor, [image], args.class_name, plus_plus=args.plus_plus)
    heat = result.maps[0]
    if args.colorbar:
        picture = overlay.heatmap_with_colorbar(image, heat, args.alpha, args.cmap)
    else:
        picture = overlay.overlay_heatmap(image, heat, args.alpha, args.cmap)
    return heat, picture, int(result.class_indices[0]), result.probs[0]


def _shap_outputs(predictor, image, args):
    (result,) = shap_explainer.explain_shap(
        predictor, [image], top_k=1, max_evals=args.max_evals, batch_size=args.batch_size, class_names=args.class_name
    )
    values = result.values[0]
    if args.colorbar:
        picture = overlay.signed_with_colorbar(image, values)
    else:
        picture = overlay.overlay_signed(image, values)
    return values, picture, int(result.class_indices[0]), result.probs


def explain_folder(predictor: Predictor, paths: list[Path], args: argparse.Namespace) -> list[dict]:
    """Writes X.png and X.npy for each image; returns one summary row per image."""
    args.out.mkdir(parents=True, exist_ok=True)
    explain = _gradcam_outputs if args.method == "gradcam" else _shap_outputs
    rows = []
    for path in paths:
        image = read_rgb(path)
        values, picture, class_index, probs = explain(predictor, image, args)
        np.save(args.out / f"{path.stem}.npy", values.astype(np.float32))
        (args.out / f"{path.stem}.png").write_bytes(overlay.encode_png(picture))
        names = list(predictor.class_names)
        rows.append(
            {
                "image": path.name,
                "explained_class": names[class_index],
                "probabilities": {n: float(p) for n, p in zip(names, probs)},
            }
        )
        print(f"{path.name}: {args.method} for {names[class_index]} -> {args.out / path.stem}.png", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        paths = list_images(args.images)
        predictor = load_predictor(args.model)
        _check_args(args, predictor.class_names)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    rows = explain_folder(predictor, paths, args)
    summary = {"model": args.model, "method": args.method, "plus_plus": args.plus_plus, "images": rows}
    if args.method == "shap":
        summary["max_evals"] = args.max_evals
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
