"""Cost of explanations on this machine: Grad-CAM against a bare forward pass, and SHAP seconds.

    python scripts/bench_explain.py [--model models/default] [--repeats 20] [--shap-images 1] [--regions superpixels]

- `forward_ms`: one image through a compiled `model(x)` (batch 1, as the predict queue runs).
- `predict_gradcam_ms`: the same image through the compiled one-pass prediction + Grad-CAM with a
  gradient tape (`ml.explain.gradcam_function`); `gradcam_over_forward` is their ratio (target
  <= 1.5). `predict_served_map_ms` / `served_map_over_forward`: the pass the worker runs
  (`gradcam_method`: "forward", the class activation map, where it equals Grad-CAM).
  Both are medians of interleaved runs, after the graphs are traced, so that a neighbour's load
  hits both alike. `explain_gradcam_ms` adds preprocessing, calibration and the resize to the
  original image size (`explain_gradcam` on a uint8 image).
- `shap_s_300`, `shap_s_500`: seconds per image for Partition SHAP (top 3 classes) with 300 and
  500 evaluations at the model's input size (target: 500 in <= 10 s on 2 cores);
  `shap_cpu_s_500` the CPU seconds this process spent on each (all threads: on a machine shared
  with other work the wall time grows, the CPU time hardly), `shap_model_cpu_s_500` the part of it
  spent inside model calls (the rest is shap, the masker and the segmentation), and
  `shap_model_calls_500` / `shap_model_rows_500` how many model calls and masked images shap made
  per image. `--regions` picks the SHAP regions (default: the served ones). `--shap-only` skips the
  Grad-CAM part.

`--model` defaults to models/default when it has a manifest.json, else an untrained model at
120x160 (`--untrained-size`). The last line of output is JSON.
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
IMAGES = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ham10000-200x150" / "images"
)  # ../shared beside the repo


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="artifact folder or 'untrained' (default: models/default if present)")
    p.add_argument("--untrained-size", type=int, nargs=2, default=(120, 160), metavar=("H", "W"))
    p.add_argument("--repeats", type=int, default=20, help="timed runs of each single-image pass")
    p.add_argument("--shap-images", type=int, default=1, help="images timed for each SHAP setting")
    p.add_argument("--shap-batch-size", type=int, default=64)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--shap-only", action="store_true", help="skip the Grad-CAM measurements")
    p.add_argument("--regions", default=None, help="SHAP regions: superpixels or blocks (default: the served ones)")
    return p.parse_args(argv)


def load(args):
    from ml import Predictor

    spec = args.model
    if spec is None:
        spec = str(ROOT / "models/default") if (ROOT / "models/default/manifest.json").is_file() else "untrained"
    if spec == "untrained":
        return "untrained", Predictor.untrained(input_size=tuple(args.untrained_size))
    return spec, Predictor.load(spec)


def sample_images(n: int) -> list[np.ndarray]:
    """Real dermoscopic images when the data set is here (SHAP's cost depends on content), else noise."""
    from PIL import Image

    paths = sorted(IMAGES.glob("*.jpg"))[:n] if IMAGES.is_dir() else []
    if len(paths) == n:
        return [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (150, 200, 3), dtype=np.uint8) for _ in range(n)]


def _ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def bench_gradcam(predictor, image: np.ndarray, repeats: int) -> dict:
    import tensorflow as tf

    from ml.explain import explain_gradcam, gradcam_function
    from ml.explain.gradcam import map_function

    model = predictor.model
    h, w = predictor.input_size
    signature = [tf.TensorSpec((None, h, w, 3), tf.float32)]
    forward = tf.function(lambda x: model(x, training=False), input_signature=signature)
    gradcam = gradcam_function(model, predictor.gradcam_layer)
    served = map_function(model, predictor.gradcam_layer, False)  # the forward CAM where it is exact
    x = tf.constant(predictor.preprocess(image)[np.newaxis])
    predicted = tf.constant([-1], tf.int32)
    offsets = tf.constant(np.zeros(len(predictor.class_names), np.float32))
    run_forward = lambda: forward(x).numpy()  # noqa: E731
    run_gradcam = lambda: [t.numpy() for t in gradcam(x, predicted, offsets)]  # noqa: E731
    run_served = lambda: [t.numpy() for t in served(x, predicted, offsets)]  # noqa: E731
    for _ in range(3):  # trace, then warm the kernels
        run_forward(), run_gradcam(), run_served()
    times = np.array([(_ms(run_forward), _ms(run_gradcam), _ms(run_served)) for _ in range(repeats)])
    explain_ms = np.median([_ms(lambda: explain_gradcam(predictor, [image])) for _ in range(max(repeats // 4, 3))])
    forward_ms, gradcam_ms, served_ms = np.median(times, axis=0)
    return {
        "forward_ms": round(float(forward_ms), 2),
        "predict_gradcam_ms": round(float(gradcam_ms), 2),
        "gradcam_over_forward": round(float(gradcam_ms / forward_ms), 3),
        "gradcam_method": predictor.gradcam_method,
        "predict_served_map_ms": round(float(served_ms), 2),
        "served_map_over_forward": round(float(served_ms / forward_ms), 3),
        "explain_gradcam_ms": round(float(explain_ms), 2),
    }


def bench_shap(predictor, images: list[np.ndarray], args) -> dict:
    from ml.explain import probability_function, shap_values
    from ml.explain.shap_explainer import DEFAULT_REGIONS

    regions = args.regions or DEFAULT_REGIONS
    compiled = probability_function(predictor.model, float(predictor.temperature))
    rows, model_cpu = [], []

    def model_fn(batch):
        start = time.process_time()
        out = compiled(batch)
        model_cpu.append(time.process_time() - start)
        rows.append(len(batch))
        return out

    def run(x, evals):
        return shap_values(
            model_fn, x, top_k=args.top_k, max_evals=evals, batch_size=args.shap_batch_size, regions=regions
        )

    inputs = [predictor.preprocess(im) for im in images]
    run(inputs[0], 100)  # trace, numba
    for size in (1, 2, 4, 8, 16, 32, 64):  # every padded batch shape, as the worker's warm-up does
        compiled(np.zeros((size, *inputs[0].shape), np.float32))
    result = {"shap_regions": regions}
    for evals in (300, 500):
        seconds, cpu = [], []
        rows.clear(), model_cpu.clear()
        for x in inputs:
            start, start_cpu = time.perf_counter(), time.process_time()
            run(x, evals)
            seconds.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        result[f"shap_s_{evals}"] = round(float(np.mean(seconds)), 2)
        result[f"shap_cpu_s_{evals}"] = round(float(np.mean(cpu)), 2)
        result[f"shap_model_cpu_s_{evals}"] = round(sum(model_cpu) / len(inputs), 2)
        result[f"shap_model_calls_{evals}"] = round(len(rows) / len(inputs), 1)
        result[f"shap_model_rows_{evals}"] = round(sum(rows) / len(inputs), 1)
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    name, predictor = load(args)
    images = sample_images(max(args.shap_images, 1))
    result = {"model": name, "input_size": list(predictor.input_size), "gradcam_layer": predictor.gradcam_layer}
    if not args.shap_only:
        result.update(bench_gradcam(predictor, images[0], args.repeats))
        print(json.dumps(result), flush=True)
    if args.shap_images > 0:
        result.update(bench_shap(predictor, images[: args.shap_images], args))
    result.update(
        {
            "shap_batch_size": args.shap_batch_size,
            "shap_top_k": args.top_k,
            "cpu_count": os.cpu_count(),
            "loadavg_1min_before": round(load_before, 2),
            "loadavg_1min_after": round(os.getloadavg()[0], 2),
        }
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
