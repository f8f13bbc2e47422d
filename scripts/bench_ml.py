"""Training and inference throughput (images/s) of EfficientNetB3+CBAM on this machine.

    python scripts/bench_ml.py [--img-size 120 160] [--batch-size 32] [--train-steps 6] [--jit]
    python scripts/bench_ml.py --compare-xla [--model models/default] [--threads 1]

Training runs the same compiled train step as `ml.train` (AdamW, focal loss, tf.data with
augmentation) on random images; inference goes through `Predictor.predict` (resize + forward +
calibration). The first steps (graph tracing) are excluded. The last line of output is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench_training(size, batch_size, steps, jit) -> dict:
    import keras
    import numpy as np

    from ml import augment as A
    from ml.model import ModelConfig, build_model

    rng = np.random.default_rng(0)
    n = batch_size * (steps + 2)
    images = rng.integers(0, 256, (n, *size, 3), dtype=np.uint8)
    labels = rng.integers(0, 7, n)
    batches = A.ImageBatches(images, labels, batch_size, size, training=True, recipe=A.AugmentRecipe())
    model = build_model(ModelConfig(input_size=size))
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3, weight_decay=1e-4),
        loss=keras.losses.CategoricalFocalCrossentropy(alpha=[1.0] * 7),
        jit_compile=jit,
    )
    t0 = time.perf_counter()
    model.fit(batches, epochs=1, steps_per_epoch=2, verbose=0)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.fit(batches, epochs=1, steps_per_epoch=steps, verbose=0)
    seconds = time.perf_counter() - t0
    return {
        "train_images_per_s": round(steps * batch_size / seconds, 2),
        "train_seconds_per_step": round(seconds / steps, 3),
        "train_first_two_steps_s": round(first, 1),
    }


def bench_inference(size, batch_size, n_images) -> dict:
    import numpy as np

    from ml.predictor import Predictor

    predictor = Predictor.untrained(input_size=size)
    predictor.batch_size = batch_size
    rng = np.random.default_rng(1)
    # Uploads arrive at the dataset's 150x200 (or larger); resizing is part of the cost.
    images = [rng.integers(0, 256, (150, 200, 3), dtype=np.uint8) for _ in range(n_images)]
    predictor.predict(images[:batch_size])  # trace
    t0 = time.perf_counter()
    predictor.predict(images)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    predictor.predict(images[:1])
    single = time.perf_counter() - t0
    return {
        "inference_images_per_s": round(n_images / seconds, 2),
        "inference_single_image_ms": round(single * 1000, 1),
    }


def compare_xla(model_dir, threads: int, batch_size: int = 16, passes: int = 15) -> dict:
    """The served forward pass as a plain graph and XLA-compiled (`jit_compile`), in the worker's
    layout (`threads` TensorFlow threads, one fixed batch shape): pass time and largest output gap."""
    import numpy as np
    import tensorflow as tf

    from ml.predictor import Predictor

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    predictor = Predictor.load(model_dir) if model_dir else Predictor.untrained()
    h, w = predictor.input_size
    batch = tf.constant(np.random.default_rng(0).integers(0, 256, (batch_size, h, w, 3)).astype(np.float32))
    result, outputs = {"xla_threads": threads, "xla_batch_size": batch_size}, {}
    for jit in (False, True):
        forward = tf.function(
            lambda x: predictor.model(x, training=False),
            jit_compile=jit,
            input_signature=[tf.TensorSpec(batch.shape, tf.float32)],
        )
        outputs[jit] = forward(batch).numpy()  # traces (and compiles)
        for _ in range(3):
            forward(batch)
        t0 = time.perf_counter()
        for _ in range(passes):
            forward(batch)
        name = "xla" if jit else "graph"
        result[f"{name}_images_per_s"] = round(batch_size * passes / (time.perf_counter() - t0), 1)
    result["xla_max_abs_diff"] = float(np.abs(outputs[True] - outputs[False]).max())
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--img-size", type=int, nargs=2, default=[120, 160], metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=6)
    p.add_argument("--inference-images", type=int, default=128)
    p.add_argument("--jit", action="store_true", help="XLA-compile the train step")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument(
        "--compare-xla", action="store_true", help="only compare the served forward pass with and without XLA"
    )
    p.add_argument("--model", help="artifact folder for --compare-xla (default: untrained)")
    p.add_argument("--threads", type=int, default=1, help="TensorFlow threads for --compare-xla")
    args = p.parse_args(argv)
    if args.compare_xla:
        print(json.dumps(compare_xla(args.model, args.threads)))
        return
    import tensorflow as tf

    size = tuple(args.img_size)
    result = {
        "input_size": list(size),
        "batch_size": args.batch_size,
        "jit_compile": args.jit,
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
    }
    if not args.skip_train:
        result.update(bench_training(size, args.batch_size, args.train_steps, args.jit))
    result.update(bench_inference(size, args.batch_size, args.inference_images))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
