"""Training: `python -m ml.train --data DIR --out runs/NAME [options]`.

The run folder (`--out`) holds everything about one run and is itself a model artifact at the end:

    args.json, versions.json   exact arguments and library versions
    split.csv                  the lesion-grouped split (image_id, lesion_id, dx, split)
    train.log, history.csv     log and one row of metrics per epoch
    checkpoints/epoch-NNNN/    last epochs: model + optimizer weights and the training state
    best.weights.h5            weights of the best epoch (by --monitor on validation)
    model.weights.h5, manifest.json, calibration.json, eval_test/   written when training ends

Interrupted runs continue with `--resume` (same --out): the newest complete checkpoint gives the
weights, optimizer moments, epoch, learning rate, best metric and early-stopping counters, so a
kill loses at most the epoch in progress.

With pretrained weights there are two stages: the backbone frozen for --warmup-epochs, then the
blocks from --unfreeze-from-block on trainable with BatchNorm kept frozen. From scratch
(--weights none) a frozen random backbone would learn nothing, so everything trains in one stage.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas
import sklearn

from ml import augment as A
from ml import calibration as C
from ml import data as D
from ml import metrics as M
from ml.artifact import (
    WEIGHTS,
    build_manifest,
    convert_weights_file,
    load_model_weights,
    save_model_weights,
    write_manifest,
)
from ml.augment import ImageBatches
from ml.decision import Decision, class_prior, fit_decision
from ml.losses import LogitAdjustedCrossentropy
from ml.model import ModelConfig, build_model, shift_head_bias

log = logging.getLogger("ml.train")

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
# Changing these on --resume would make the checkpoint meaningless; --epochs may grow.
FIXED_ON_RESUME = ("data", "img_size", "weights", "cbam", "cbam_stages", "dropout", "seed", "split")


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ml.train", description=__doc__.split("\n")[0])
    p.add_argument("--data", help="dataset: HAM10000 folder, class folders, or ISIC 2019 ground-truth CSV")
    p.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--epochs", type=int, default=40, help="total epochs over both stages")
    p.add_argument("--img-size", type=int, nargs=2, default=[120, 160], metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--weights", default="none", help="backbone init: none | imagenet | PATH to .h5")
    p.add_argument(
        "--loss",
        choices=["focal", "ce", "logit_adjusted"],
        default="focal",
        help="focal (class-weighted), ce (class-weighted), logit_adjusted (cross-entropy on log p + tau log prior)",
    )
    p.add_argument("--la-tau", type=float, default=1.0, help="prior weight of the logit-adjusted loss")
    p.add_argument("--gamma", type=float, default=2.0, help="focal-loss focusing parameter")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument(
        "--balance",
        choices=["class_weight", "sampling", "none"],
        default="class_weight",
        help="class_weight: per-class loss weights (focal alpha); sampling: every class drawn equally often",
    )
    p.add_argument(
        "--class-weight-power", type=float, default=0.5, help="weights (n/(k n_c))**power; 1 = fully balanced"
    )
    p.add_argument("--optimizer", choices=["adamw", "adam"], default="adamw")
    p.add_argument("--schedule", choices=["plateau", "cosine"], default="plateau", help="learning-rate schedule")
    p.add_argument("--lr-warmup-epochs", type=int, default=0, help="cosine: linear warm-up epochs")
    p.add_argument("--init-from", default=None, help="warm start: weights of a whole model of the same config (.h5)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (from scratch, or stage 1)")
    p.add_argument("--fine-tune-lr", type=float, default=1e-4, help="stage-2 learning rate (pretrained only)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-epochs", type=int, default=3, help="stage-1 epochs with a frozen pretrained backbone")
    p.add_argument("--unfreeze-from-block", type=int, default=5, help="stage 2 trains blocks >= this (1-7) and the top")
    p.add_argument(
        "--monitor",
        choices=["balanced_accuracy", "balanced_accuracy_decided", "macro_auc"],
        default="balanced_accuracy_decided",
        help="validation metric that picks the best epoch; *_decided is at the decision that would ship",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=8,
        help="early-stopping patience in epochs (not with --schedule cosine, which runs to its end)",
    )
    p.add_argument("--lr-patience", type=int, default=3, help="ReduceLROnPlateau patience in epochs")
    p.add_argument("--lr-factor", type=float, default=0.5)
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument(
        "--augment",
        choices=sorted(A.RECIPES),
        default="strong",
        help="strong: crops, 90-degree turns, colour, mixup; mild: flips, light crops and colour",
    )
    p.add_argument("--cbam", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--cbam-stages", type=int, nargs="*", default=[], help="also put CBAM after these backbone stages")
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--split", type=float, nargs=3, default=[0.70, 0.15, 0.15], metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument(
        "--malignant-sensitivity", type=float, default=None, help="malignant threshold rule (default Youden)"
    )
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument(
        "--jit-compile",
        choices=["auto", "on", "off"],
        default="off",
        help="XLA for the train step (much slower on CPU)",
    )
    p.add_argument(
        "--run-eagerly", action="store_true", help="no graph tracing: for debugging and tiny smoke runs only"
    )
    p.add_argument("--no-test-eval", action="store_true", help="skip evaluating the test split at the end")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates of the final test evaluation")
    p.add_argument("--model-name", default=None)
    p.add_argument("--model-version", default=None, help="default: YYYY.MM.DD of the end of training")
    p.add_argument(
        "--pack-resume",
        action="store_true",
        help="write the compact float16 carry-over (resume/) of the run in --out and exit; commit it so a later session can --resume",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop after the epoch in which this many minutes have passed (the run can be resumed)",
    )
    p.add_argument(
        "--snapshot",
        default=None,
        metavar="DIR",
        help="write an artifact of the run's best weights so far to DIR (calibrated, with its decision and test "
        "evaluation) and exit; the run itself goes on with --resume",
    )
    p.add_argument(
        "--verbose", type=int, choices=[0, 1, 2], default=None, help="Keras fit verbosity (default: bar on a terminal)"
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line; with --resume, the run's args.json wins over everything but --epochs.

    Raises:
        ValueError: for impossible values, a missing --data, or --resume without a run to resume.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    given = [a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv)]
    explicit = {a.dest for a in parser._actions if any(opt in given for opt in a.option_strings)}
    if args.pack_resume:
        return args  # only --out matters
    if args.resume or args.snapshot:
        args = _merge_saved_args(args, explicit)
    _validate_args(args)
    return args


def _merge_saved_args(args: argparse.Namespace, explicit: set[str]) -> argparse.Namespace:
    saved_path = Path(args.out) / "args.json"
    if not saved_path.is_file():
        raise ValueError(f"--resume was given but {str(saved_path)!r} does not exist; start the run without --resume.")
    saved = json.loads(saved_path.read_text())
    merged = argparse.Namespace(**{**vars(args), **saved})
    merged.resume, merged.out, merged.snapshot = True, args.out, args.snapshot
    for key in explicit - {"resume", "out"}:
        new, old = getattr(args, key), saved.get(key)
        if key in FIXED_ON_RESUME and new != old and not (key == "data" and _same_path(new, old)):
            raise ValueError(
                f"--{key.replace('_', '-')} {new!r} differs from the run's {old!r}; it cannot change on --resume."
            )
        setattr(merged, key, new)  # e.g. --epochs to extend, --verbose
    return merged


def _same_path(a, b) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def _validate_args(args) -> None:
    if not args.data:
        raise ValueError("--data is required (the dataset folder or ISIC 2019 CSV).")
    if args.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}.")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if min(args.img_size) < 32:
        raise ValueError(f"--img-size must be at least 32 32, got {args.img_size}.")
    if args.lr <= 0 or args.fine_tune_lr <= 0:
        raise ValueError("Learning rates must be positive.")
    if not 1 <= args.unfreeze_from_block <= 7:
        raise ValueError(f"--unfreeze-from-block must be between 1 and 7, got {args.unfreeze_from_block}.")


# ------------------------------------------------------------------------------------------------
# Run folder bookkeeping
# ------------------------------------------------------------------------------------------------


def setup_logging(run_dir: Path) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger("ml")
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in (logging.FileHandler(run_dir / "train.log"), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.propagate = False


def library_versions() -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "keras_backend": keras.backend.backend(),
        keras.backend.backend(): _backend_module().__version__,  # e.g. "tensorflow": "2.21.0"
        "keras": keras.__version__,
        "numpy": np.__version__,
        "pandas": pandas.__version__,
        "scikit-learn": sklearn.__version__,
        "opencv": cv2.__version__,
        "gpus": gpu_names(),
    }


def write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serialisable.")


def _backend_module():
    """The array library under Keras: TensorFlow here, JAX on a GPU machine that has no TensorFlow."""
    import importlib

    return importlib.import_module(keras.backend.backend())


def gpu_names() -> list[str]:
    """The GPUs the Keras backend sees (empty on a CPU-only machine)."""
    backend = _backend_module()
    if keras.backend.backend() == "tensorflow":
        return [d.name for d in backend.config.list_physical_devices("GPU")]
    if keras.backend.backend() == "jax":
        return [str(d) for d in backend.devices() if d.platform == "gpu"]
    return []


def configure_hardware() -> str:
    """mixed_float16 on a GPU (tensor cores gain from it); float32 on CPU, where it only slows."""
    if gpu_names():
        keras.mixed_precision.set_global_policy("mixed_float16")
        return "mixed_float16"
    keras.mixed_precision.set_global_policy("float32")
    return "float32"


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


class RunCheckpoints:
    """Per-epoch checkpoints in `checkpoints/epoch-NNNN/`, state.json written last.

    A checkpoint without state.json (killed while writing) is ignored, so the newest complete
    one is always consistent.
    """

    def __init__(self, run_dir: Path, keep: int = 2):
        self.dir = run_dir / CHECKPOINTS
        self.keep = max(1, keep)

    def save(self, model: keras.Model, state: dict) -> Path:
        target = self.dir / f"epoch-{state['epoch']:04d}"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        save_model_weights(model, target / "model.weights.h5")
        store: dict = {}
        model.optimizer.save_own_variables(store)
        np.savez(target / "optimizer.npz", **store)
        write_json(target / STATE_FILE, state)
        self._prune()
        return target

    def latest(self) -> Path | None:
        complete = sorted(p for p in self.dir.glob("epoch-*") if (p / STATE_FILE).is_file())
        return complete[-1] if complete else None

    @staticmethod
    def read_state(path: Path) -> dict:
        return json.loads((path / STATE_FILE).read_text())

    @staticmethod
    def restore_model(model: keras.Model, path: Path) -> None:
        load_model_weights(model, path / "model.weights.h5")

    @staticmethod
    def restore_optimizer(model: keras.Model, path: Path) -> None:
        """Builds the optimizer on the current trainable variables, then loads its saved moments."""
        optimizer = model.optimizer
        optimizer.build(model.trainable_variables)
        with np.load(path / "optimizer.npz") as saved:
            store = {k: saved[k] for k in saved.files}
        if len(store) != len(optimizer.variables):
            raise ValueError(
                f"Checkpoint {str(path)!r} has {len(store)} optimizer variables but the optimizer has "
                f"{len(optimizer.variables)}; the trainable layers differ from the interrupted run."
            )
        optimizer.load_own_variables(store)

    def _prune(self) -> None:
        complete = sorted(p for p in self.dir.glob("epoch-*") if (p / STATE_FILE).is_file())
        for old in complete[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Carry-over between machines
# ------------------------------------------------------------------------------------------------

CARRYOVER = "resume"


def pack_carryover(run_dir: Path) -> Path:
    """Writes `resume/`: the newest checkpoint's weights and the best weights as float16, plus state.

    A full checkpoint (float32 weights and Adam moments, ~200 MB) is too big to commit; this is
    ~45 MB. Resuming from it restarts the optimizer's moments, which Adam re-estimates within a
    few hundred steps; the epoch, learning rate, best metric and early-stopping counters carry over.
    """
    latest = RunCheckpoints(run_dir).latest()
    if latest is None:
        raise ValueError(f"Run folder {str(run_dir)!r} has no complete checkpoint to pack.")
    target = run_dir / CARRYOVER
    target.mkdir(exist_ok=True)
    convert_weights_file(latest / "model.weights.h5", target / "model.weights.h5", "float16")
    if (run_dir / "best.weights.h5").is_file():
        convert_weights_file(run_dir / "best.weights.h5", target / "best.weights.h5", "float16")
    shutil.copyfile(latest / STATE_FILE, target / STATE_FILE)
    return target


def unpack_carryover(run_dir: Path, model: keras.Model) -> dict | None:
    """Restores weights (and best.weights.h5) from `resume/` when no full checkpoint is here."""
    source = run_dir / CARRYOVER
    if not (source / STATE_FILE).is_file():
        return None
    load_model_weights(model, source / "model.weights.h5")
    if (source / "best.weights.h5").is_file() and not (run_dir / "best.weights.h5").is_file():
        convert_weights_file(source / "best.weights.h5", run_dir / "best.weights.h5", "float32")
    return json.loads((source / STATE_FILE).read_text())


# ------------------------------------------------------------------------------------------------
# Callbacks
# ------------------------------------------------------------------------------------------------


class ValidationMetrics(keras.callbacks.Callback):
    """Predicts the validation set once per epoch and adds val_* metrics to the logs."""

    def __init__(self, val_ds, val_labels, loss_fn, prior: tuple[float, ...], prior_shift: np.ndarray):
        super().__init__()
        self.val_ds, self.val_labels, self.loss_fn = val_ds, np.asarray(val_labels), loss_fn
        self.prior, self.prior_shift = prior, prior_shift

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs if logs is not None else {}
        probs = self.model.predict(self.val_ds, verbose=0)
        onehot = np.eye(probs.shape[1], dtype=np.float32)[self.val_labels]
        logs["val_loss"] = float(keras.ops.convert_to_numpy(keras.ops.mean(self.loss_fn(onehot, probs))))
        logs["val_nll"] = M.negative_log_likelihood(self.val_labels, probs)
        logs["val_accuracy"] = float(np.mean(probs.argmax(1) == self.val_labels))
        logs["val_balanced_accuracy"] = M.balanced_accuracy(self.val_labels, probs.argmax(1))
        auc = M.macro_auc(self.val_labels, probs)
        logs["val_macro_auc"] = float("nan") if auc is None else auc
        logs["val_balanced_accuracy_decided"] = decided_balanced_accuracy(
            self.val_labels, probs, self.prior, self.prior_shift
        )


def decided_balanced_accuracy(
    y_val: np.ndarray, probs: np.ndarray, prior: tuple[float, ...], prior_shift: np.ndarray
) -> float:
    """Validation balanced accuracy of what would ship: the prior folded back into the outputs (a
    logit-adjusted run), calibrated, and the decision's tau chosen on the same validation split."""
    posterior = C.calibrated_softmax(np.log(np.clip(probs, 1e-12, 1.0)) + prior_shift)
    calibrated = C.apply_temperature(posterior, C.fit_temperature(y_val, posterior)["temperature"])
    decision, scores = fit_decision(y_val, calibrated, prior)
    return scores[decision.tau]


def early_stop_due(state: dict, args) -> bool:
    """Whether the run stops for want of improvement. A cosine schedule runs to its end: its last,
    low-learning-rate epochs are the ones it is chosen for, and the best epoch is kept anyway."""
    return args.schedule != "cosine" and state["es_wait"] >= args.patience


class TrainingController(keras.callbacks.Callback):
    """ReduceLROnPlateau + EarlyStopping + best checkpoint + history.csv + resumable state.

    One object holds all counters so that they are saved and restored together with the
    weights; Keras' own callbacks reset theirs in on_train_begin, which breaks --resume.
    """

    def __init__(self, run_dir: Path, checkpoints: RunCheckpoints, state: dict, args):
        super().__init__()
        self.run_dir, self.checkpoints, self.state, self.args = run_dir, checkpoints, state, args
        self.monitor = f"val_{args.monitor}"
        self.early_stopping = True
        self._epoch_start = self._started = time.time()
        self.out_of_time = False

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = time.time()
        if self.args.schedule == "cosine":
            self.model.optimizer.learning_rate = cosine_lr(epoch, self.args)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs if logs is not None else {}
        s = self.state
        value = logs.get(self.monitor, float("nan"))
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        improved = math.isfinite(value) and (s["best"] is None or value > s["best"] + 1e-4)
        if improved:
            s.update(best=float(value), best_epoch=epoch + 1, es_wait=0, lr_wait=0)
            save_model_weights(self.model, self.run_dir / "best.weights.h5")
        else:
            s["es_wait"] += 1
            s["lr_wait"] += 1
            if self.args.schedule == "plateau":
                lr = self._maybe_reduce_lr(lr)
        if self.early_stopping and early_stop_due(s, self.args):
            s["stopped_early"] = True
            self.model.stop_training = True
        max_minutes = getattr(self.args, "max_minutes", None)
        if max_minutes and time.time() - self._started >= max_minutes * 60:
            self.out_of_time = True  # a lent GPU's minutes are counted: stop after this epoch
            self.model.stop_training = True
        row = {
            "epoch": epoch + 1,
            "stage": s["stage"],
            "lr": lr,
            "seconds": round(time.time() - self._epoch_start, 1),
        }
        row.update({k: float(v) for k, v in logs.items() if k != "learning_rate"})
        self._append_history(row)
        s.update(epoch=epoch + 1, lr=lr)
        self.checkpoints.save(self.model, s)
        log.info(
            "epoch %d/%d %s: %s%s",
            epoch + 1,
            self.args.epochs,
            s["stage"],
            " ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in ("epoch", "stage")),
            " (best)" if improved else "",
        )

    def _maybe_reduce_lr(self, lr: float) -> float:
        s = self.state
        if s["lr_wait"] >= self.args.lr_patience and lr > self.args.min_lr * (1 + 1e-6):
            new = max(lr * self.args.lr_factor, self.args.min_lr)
            self.model.optimizer.learning_rate = new
            s["lr_wait"] = 0
            log.info(
                "validation %s has not improved for %d epochs: learning rate %.3g -> %.3g",
                self.monitor,
                self.args.lr_patience,
                lr,
                new,
            )
            return new
        return lr

    def _append_history(self, row: dict) -> None:
        path = self.run_dir / "history.csv"
        rows = _read_history(path)
        rows = [r for r in rows if int(r["epoch"]) < row["epoch"]] + [row]
        _write_history(path, rows)


def _read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _write_history(path: Path, rows: list[dict]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Stages, model and loss
# ------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    end_epoch: int  # exclusive: the stage covers epochs [previous end, end_epoch)
    lr: float
    trainable: str  # "all", "head" or "top_blocks"


def plan_stages(args: argparse.Namespace) -> list[Stage]:
    """One stage from scratch; warm-up with the backbone frozen, then fine-tuning when pretrained."""
    if args.weights in ("none", "", None):
        return [Stage("scratch", args.epochs, args.lr, "all")]
    warmup = min(args.warmup_epochs, args.epochs)
    stages = [Stage("warmup", warmup, args.lr, "head")] if warmup > 0 else []
    if args.epochs > warmup:
        stages.append(Stage("finetune", args.epochs, args.fine_tune_lr, "top_blocks"))
    return stages


def set_trainable(model: keras.Model, mode: str, unfreeze_from_block: int = 5) -> None:
    """Chooses which layers train: all; only ours (head, CBAM); or ours + the top backbone blocks.

    BatchNorm stays frozen while fine-tuning a pretrained backbone: with batches of 32 its
    statistics would drift from the ones the pretrained weights were learned with.
    """
    model.trainable = True
    if mode == "all":
        return
    top_prefixes = tuple(f"block{b}" for b in range(unfreeze_from_block, 8)) + ("top_",)
    for layer in model.layers:
        ours = layer.name.startswith(("cbam", "avg_pool", "top_dropout", "predictions"))
        in_top = layer.name.startswith(top_prefixes) and mode == "top_blocks"
        layer.trainable = ours or (in_top and not isinstance(layer, keras.layers.BatchNormalization))


def make_loss(
    args: argparse.Namespace, class_weight_vector: np.ndarray, class_prior: np.ndarray | None = None
) -> keras.losses.Loss:
    """The training loss: focal or weighted cross-entropy with per-class alpha, or logit-adjusted CE.

    Focal and "ce" (focal with gamma 0) weight each class by alpha = the class weights; with
    balanced sampling the classes are already balanced, so alpha is uniform. "logit_adjusted"
    (Menon et al., 2021) trains on log p + tau log prior instead, so that the network's own output
    is the class-balanced posterior and no weights are needed.
    """
    if args.loss == "logit_adjusted":
        if class_prior is None:
            raise ValueError("The logit-adjusted loss needs the class prior of the training split.")
        return LogitAdjustedCrossentropy(class_prior, tau=args.la_tau, label_smoothing=args.label_smoothing)
    alpha = class_weight_vector.tolist() if args.balance == "class_weight" else [1.0] * len(class_weight_vector)
    gamma = args.gamma if args.loss == "focal" else 0.0
    return keras.losses.CategoricalFocalCrossentropy(
        alpha=alpha, gamma=gamma, label_smoothing=args.label_smoothing, name=f"{args.loss}_loss"
    )


def cosine_lr(epoch: int, args: argparse.Namespace) -> float:
    """Learning rate of an epoch (0-based): linear warm-up, then cosine decay to --min-lr at --epochs."""
    if epoch < args.lr_warmup_epochs:
        return args.lr * (epoch + 1) / (args.lr_warmup_epochs + 1)
    span = max(1, args.epochs - args.lr_warmup_epochs)
    progress = min(1.0, (epoch - args.lr_warmup_epochs) / span)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(args: argparse.Namespace, lr: float) -> keras.optimizers.Optimizer:
    if args.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr, weight_decay=args.weight_decay)
    return keras.optimizers.Adam(learning_rate=lr)


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        input_size=tuple(args.img_size),
        cbam=args.cbam,
        cbam_stages=tuple(args.cbam_stages),
        dropout=args.dropout,
        weights=args.weights,
        seed=args.seed,
    )


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def prepare_split(args: argparse.Namespace, run_dir: Path) -> pandas.DataFrame:
    """Reads the data and the run's split (made and saved on the first start)."""
    table = D.read_dataset(args.data)
    split_csv = run_dir / "split.csv"
    if split_csv.is_file():
        table = D.apply_split(table, split_csv, absent_ok=("test",))  # training never reads them
    else:
        table = D.split_by_lesion(table, tuple(args.split), seed=args.seed)
        D.save_split(table, split_csv)
    for name in D.SPLITS:
        part = table[table["split"] == name]
        log.info(
            "%s: %d images, %d lesions, %s",
            name,
            len(part),
            part["lesion_id"].nunique(),
            part["dx"].value_counts().to_dict(),
        )
    if not (table["split"] == "train").any() or not (table["split"] == "val").any():
        raise ValueError("The split left no training or no validation images; the dataset is too small.")
    return table


@dataclass
class TrainingData:
    """The run's split table, and the images and labels it trains and validates on."""

    table: pandas.DataFrame
    x_train: np.ndarray  # at the augmentation's source size (random crops are cut from it)
    y_train: np.ndarray
    x_val: np.ndarray  # at the training size
    y_val: np.ndarray

    @property
    def prior(self) -> tuple[float, ...]:
        """The class frequencies of the training images."""
        return class_prior(self.y_train, len(D.CLASS_NAMES))


def load_training_data(args: argparse.Namespace, run_dir: Path) -> TrainingData:
    """The run's split (made and saved on the first start) and its training and validation images."""
    table = prepare_split(args, run_dir)
    train_rows, val_rows = table[table["split"] == "train"], table[table["split"] == "val"]
    size = tuple(args.img_size)
    return TrainingData(
        table,
        x_train=D.load_images(train_rows["path"], A.source_size(size)),
        y_train=D.labels_to_indices(train_rows["dx"]),
        x_val=D.load_images(val_rows["path"], size),
        y_val=D.labels_to_indices(val_rows["dx"]),
    )


@dataclass
class StartingPoint:
    """Where training starts: the state, whether weights were restored, and from which full
    checkpoint (None for a fresh start or the float16 carry-over, whose optimizer restarts)."""

    state: dict
    restored: bool = False
    checkpoint: Path | None = None


def open_run(args: argparse.Namespace) -> tuple[Path, RunCheckpoints]:
    """Creates (or reopens, with --resume) the run folder and records the run's arguments."""
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir)
    checkpoints = RunCheckpoints(run_dir, args.keep_checkpoints)
    if not args.resume and (checkpoints.latest() or (run_dir / "manifest.json").exists()):
        raise ValueError(f"Run folder {str(run_dir)!r} already holds a run; pass --resume or choose another --out.")
    if not args.resume:
        write_json(run_dir / "args.json", vars(args) | {"resume": False})
        write_json(run_dir / "versions.json", library_versions())
    elif args.epochs != json.loads((run_dir / "args.json").read_text())["epochs"]:
        write_json(run_dir / "args.json", json.loads((run_dir / "args.json").read_text()) | {"epochs": args.epochs})
    log.info("%s run in %s: %s", "resuming" if args.resume else "starting", run_dir, " ".join(sys.argv))
    return run_dir, checkpoints


def restore_starting_point(
    model: keras.Model, args: argparse.Namespace, run_dir: Path, checkpoints: RunCheckpoints, first: Stage
) -> StartingPoint:
    """Loads the weights training starts from: the newest full checkpoint, else the float16
    carry-over (with --resume), else --init-from's warm start, else none (a fresh start)."""
    latest = checkpoints.latest() if args.resume else None
    if latest is not None:
        state = checkpoints.read_state(latest)
        checkpoints.restore_model(model, latest)
        log.info(
            "restored %s (epoch %d, best %s=%s at epoch %s)",
            latest.name,
            state["epoch"],
            args.monitor,
            state["best"],
            state["best_epoch"],
        )
        return StartingPoint(state, restored=True, checkpoint=latest)
    if args.resume and (state := unpack_carryover(run_dir, model)) is not None:
        log.info(
            "restored the float16 carry-over %s/ (epoch %d); the optimizer's moments restart", CARRYOVER, state["epoch"]
        )
        return StartingPoint(state, restored=True)
    if args.init_from:
        load_model_weights(model, args.init_from)
        log.info("warm start from %s", args.init_from)
    elif args.weights in ("none", "", None):
        log.info("weights=none: training from scratch in one stage (a frozen random backbone would learn nothing)")
    return StartingPoint(_initial_state(first, args))


def train(args: argparse.Namespace) -> Path:
    """Runs (or resumes) training and finalises the run folder as a model artifact.

    Args:
        args: parsed arguments (see `build_parser`).

    Returns:
        The run folder (or --snapshot's folder).
    """
    run_dir, checkpoints = open_run(args)
    log.info("Keras backend %s, precision policy %s", keras.backend.backend(), configure_hardware())
    data = load_training_data(args, run_dir)
    model = build_model(model_config(args))
    stages = plan_stages(args)
    start = restore_starting_point(model, args, run_dir, checkpoints, stages[0])
    if args.snapshot:
        if not start.restored:
            raise ValueError(f"Run folder {str(run_dir)!r} has no checkpoint or carry-over to take a snapshot of.")
        finalize_run(args, run_dir, model, data, start.state, out_dir=Path(args.snapshot))
        return Path(args.snapshot)
    controller = TrainingController(run_dir, checkpoints, start.state, args)
    fit_stages(model, stages, data, start, controller, args)
    if controller.out_of_time:
        log.info("stopped after %.1f minutes (--max-minutes); resume the run to go on", args.max_minutes)
        return run_dir
    start.state["finished_training"] = True
    write_json(run_dir / "state.json", start.state)
    if keras.backend.backend() != "tensorflow":
        log.info(
            "training done on the %s backend: finalise on a TensorFlow machine with --snapshot DIR",
            keras.backend.backend(),
        )
        return run_dir
    finalize_run(args, run_dir, model, data, start.state)
    return run_dir


def fit_stages(
    model: keras.Model,
    stages: list[Stage],
    data: TrainingData,
    start: StartingPoint,
    controller: TrainingController,
    args: argparse.Namespace,
) -> None:
    """Trains the stages not finished yet, each from the epoch the run stands at."""
    train_ds = training_batches(data, args)
    loss_fn = training_loss(data, args)
    validation = validation_metrics(data, loss_fn, args)
    state = start.state
    begins = [0] + [stage.end_epoch for stage in stages[:-1]]
    for stage, begin in zip(stages, begins):
        if state.get("stopped_early") or state["epoch"] >= stage.end_epoch:
            continue
        first_epoch = compile_stage(model, stage, begin, start, loss_fn, args)
        controller.early_stopping = stage is stages[-1]
        train_ds.start_at(first_epoch)  # the shuffle and augmentations of this epoch, not epoch 0's again
        model.fit(
            train_ds,
            epochs=stage.end_epoch,
            initial_epoch=first_epoch,
            shuffle=False,  # ImageBatches shuffles (or samples) itself
            callbacks=[validation, controller],
            verbose=args.verbose if args.verbose is not None else (1 if sys.stdout.isatty() else 2),
        )
        if state.get("stopped_early"):
            log.info("early stopping: no improvement of %s for %d epochs", controller.monitor, args.patience)
        if controller.out_of_time:
            return


def training_batches(data: TrainingData, args: argparse.Namespace) -> ImageBatches:
    """The training images, shuffled (or class-balanced) and augmented by --augment's recipe."""
    return ImageBatches(
        data.x_train,
        data.y_train,
        args.batch_size,
        tuple(args.img_size),
        training=True,
        recipe=A.NO_AUGMENTATION if args.no_augment else A.RECIPES[args.augment],
        balance=args.balance,
        seed=args.seed,
    )


def training_loss(data: TrainingData, args: argparse.Namespace):
    """--loss with its class weights (inverse frequency to --class-weight-power) or the class prior."""
    weights = D.class_weights(data.y_train, power=args.class_weight_power)
    log.info(
        "class weights (power %s): %s",
        args.class_weight_power,
        {c: round(float(w), 3) for c, w in zip(D.CLASS_NAMES, weights)},
    )
    return make_loss(args, weights, class_prior=np.bincount(data.y_train, minlength=len(D.CLASS_NAMES)))


def validation_metrics(data: TrainingData, loss_fn, args: argparse.Namespace) -> ValidationMetrics:
    """The callback that scores every epoch on validation, the shipped decision's balanced accuracy included."""
    batches = ImageBatches(data.x_val, data.y_val, args.batch_size, tuple(args.img_size))
    return ValidationMetrics(batches, data.y_val, loss_fn, data.prior, prior_shift(args, data.prior))


def prior_shift(args: argparse.Namespace, prior: tuple[float, ...]) -> np.ndarray:
    """What a logit-adjusted run's outputs lack of the training prior (tau * log prior); zeros otherwise."""
    if args.loss != "logit_adjusted":
        return np.zeros(len(prior))
    return args.la_tau * np.log(np.clip(prior, 1e-8, 1.0))


def compile_stage(
    model: keras.Model, stage: Stage, begin: int, start: StartingPoint, loss_fn, args: argparse.Namespace
) -> int:
    """Sets the stage's trainable layers and optimizer (its saved moments when the run resumes
    inside this stage from a full checkpoint); returns the stage's first epoch (0-based, as Keras counts)."""
    state = start.state
    resuming_stage = start.restored and state["stage"] == stage.name and state["epoch"] > begin
    set_trainable(model, stage.trainable, args.unfreeze_from_block)
    lr = state["lr"] if resuming_stage else stage.lr
    model.compile(
        optimizer=make_optimizer(args, lr),
        loss=loss_fn,
        metrics=["accuracy"],
        jit_compile=_jit(args),
        run_eagerly=bool(getattr(args, "run_eagerly", False)),
    )
    if resuming_stage:
        if start.checkpoint is not None:
            RunCheckpoints.restore_optimizer(model, start.checkpoint)
        model.optimizer.learning_rate = lr
    else:
        state.update(stage=stage.name, lr=lr, lr_wait=0)
    first_epoch = max(begin, state["epoch"])
    log.info(
        "stage %s: epochs %d-%d, lr %.3g, %d trainable weights of %d",
        stage.name,
        first_epoch + 1,
        stage.end_epoch,
        lr,
        len(model.trainable_weights),
        len(model.weights),
    )
    return first_epoch


def _initial_state(stage: Stage, args) -> dict:
    return {
        "epoch": 0,
        "stage": stage.name,
        "lr": stage.lr,
        "best": None,
        "best_epoch": None,
        "es_wait": 0,
        "lr_wait": 0,
        "stopped_early": False,
        "monitor": args.monitor,
    }


def _jit(args: argparse.Namespace) -> bool | str:
    # JAX runs eagerly op by op without jit: there XLA is the only sensible choice.
    if keras.backend.backend() == "jax":
        return True
    return {"auto": "auto", "on": True, "off": False}[args.jit_compile]


# ------------------------------------------------------------------------------------------------
# Finalisation: calibration, thresholds, manifest, test evaluation
# ------------------------------------------------------------------------------------------------


def finalize_run(
    args: argparse.Namespace,
    run_dir: Path,
    model: keras.Model,
    data: TrainingData,
    state: dict,
    out_dir: Path | None = None,
) -> dict:
    """Loads the best weights, calibrates on validation, writes the artifact files, evaluates test.

    The artifact is the run folder itself, or `out_dir` (a snapshot of a run that goes on).
    """
    out_dir = out_dir or run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if out_dir != run_dir:
        shutil.copyfile(run_dir / "split.csv", out_dir / "split.csv")
    load_best_weights(model, run_dir, args, data.prior)
    save_model_weights(model, out_dir / WEIGHTS)
    fitted = fit_on_validation(model, data, args)
    write_json(out_dir / "calibration.json", {**fitted.temperature, "thresholds": fitted.thresholds})
    manifest = run_manifest(args, data.table, state, fitted)
    write_manifest(out_dir, manifest)
    if not args.no_test_eval and (data.table["split"] == "test").any():
        manifest["metrics"]["test"] = _summary(evaluate_test(model, manifest, out_dir, args))
        write_manifest(out_dir, manifest)
    log.info("%s is a model artifact (manifest.json + %s)", out_dir, WEIGHTS)
    return manifest


def load_best_weights(model: keras.Model, run_dir: Path, args: argparse.Namespace, prior: tuple[float, ...]) -> None:
    """The best epoch's weights, with the training prior folded back into a logit-adjusted head."""
    best = run_dir / "best.weights.h5"
    if best.is_file():
        load_model_weights(model, best)
    else:  # no epoch had a finite monitor value (tiny data): ship the last weights
        save_model_weights(model, best)
    if args.loss == "logit_adjusted":  # the artifact outputs posteriors under the training frequencies
        shift_head_bias(model, prior_shift(args, prior))


@dataclass
class ValidationFit:
    """What is chosen on the validation split, and the validation metrics of the decision it gives."""

    temperature: dict  # C.fit_temperature's result
    thresholds: dict
    decision: Decision
    tau_scores: dict[float, float]  # validation balanced accuracy of every tau tried
    metrics: dict


def fit_on_validation(model: keras.Model, data: TrainingData, args: argparse.Namespace) -> ValidationFit:
    """Temperature, thresholds and the decision's tau, each fitted on the validation split."""
    probs = model.predict(ImageBatches(data.x_val, data.y_val, args.batch_size, tuple(args.img_size)), verbose=0)
    temperature = C.fit_temperature(data.y_val, probs)
    calibrated = C.apply_temperature(probs, temperature["temperature"])
    thresholds = _fit_thresholds_or_default(data.y_val, calibrated, args)
    decision, tau_scores = fit_decision(data.y_val, calibrated, data.prior)
    log.info(
        "decision: tau %.2f, validation balanced accuracy %.3f (plain argmax %.3f)",
        decision.tau,
        tau_scores[decision.tau],
        tau_scores[0.0],
    )
    log.info(
        "temperature %.3f (val NLL %.4f -> %.4f); thresholds %s",
        temperature["temperature"],
        temperature["nll_before"],
        temperature["nll_after"],
        thresholds,
    )
    metrics = M.classification_metrics(data.y_val, calibrated, decide=decision.choose)
    metrics["ece"] = M.expected_calibration_error(data.y_val, calibrated)
    metrics["ece_uncalibrated"] = M.expected_calibration_error(data.y_val, probs)
    return ValidationFit(temperature, thresholds, decision, tau_scores, metrics)


def run_manifest(args: argparse.Namespace, table: pandas.DataFrame, state: dict, fitted: ValidationFit) -> dict:
    """The artifact's manifest: the model's configuration, data, split, validation fit and training."""
    return build_manifest(
        model_config(args),
        name=args.model_name,
        version=args.model_version or datetime.now(UTC).strftime("%Y.%m.%d"),
        trained=True,
        trained_on=_describe_data(args, table),
        temperature=fitted.temperature["temperature"],
        thresholds={"malignant": fitted.thresholds["malignant"], "melanoma": fitted.thresholds["melanoma"]},
        data_fingerprint=D.data_fingerprint(table[table["split"] == "train"]),
        split={
            "seed": args.seed,
            "fractions": list(args.split),
            "grouped_by": "lesion_id",
            "stratified_by": "dx",
            **D.split_summary(table),
        },
        metrics={"validation": _summary(fitted.metrics)},
        extra={
            "decision": fitted.decision.to_manifest(),
            "decision_fit": {"split": "val", "metric": "balanced_accuracy", "by_tau": fitted.tau_scores},
            "threshold_rules": fitted.thresholds.get("rules"),
            "training": {
                "epochs_run": state["epoch"],
                "best_epoch": state["best_epoch"],
                "monitor": f"val_{args.monitor}",
                "best_value": state["best"],
                "stopped_early": bool(state.get("stopped_early")),
                "loss": args.loss,
                "balance": args.balance,
                "weights_init": args.weights,
            },
            "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )


def evaluate_test(model: keras.Model, manifest: dict, out_dir: Path, args: argparse.Namespace) -> dict:
    """The test split's metrics of the artifact just written (into out_dir/eval_test)."""
    # The in-memory model holds exactly the weights just written: no need to rebuild it.
    # Serving and evaluation use TensorFlow; training itself runs on any Keras backend.
    from ml.evaluate import evaluate
    from ml.predictor import Predictor

    predictor = Predictor(model, manifest, batch_size=args.batch_size)
    return evaluate(out_dir, args.data, out_dir / "eval_test", split="test", n_boot=args.bootstrap, predictor=predictor)


def _fit_thresholds_or_default(y_val, calibrated, args) -> dict:
    try:
        return C.fit_thresholds(y_val, calibrated, malignant_sensitivity=args.malignant_sensitivity)
    except ValueError as exc:
        # Tiny or synthetic validation sets may lack a class; a 0.5 rule is then stated, not fitted.
        log.warning("thresholds could not be fitted (%s); using 0.5", exc)
        return {"malignant": 0.5, "melanoma": 0.5, "rules": {"malignant": "default 0.5", "melanoma": "default 0.5"}}


def _summary(m: dict) -> dict:
    keep = (
        "n",
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "macro_auc",
        "nll",
        "ece",
        "ece_uncalibrated",
        "balanced_accuracy_ci",
        "macro_auc_ci",
        "melanoma",
        "malignant",
    )
    return {k: m[k] for k in keep if k in m}


def _describe_data(args, table) -> str:
    name = Path(args.data).name
    return (
        f"{name} ({len(table)} images, {table['lesion_id'].nunique()} lesions), lesion-grouped "
        f"class-stratified split {'/'.join(str(round(f * 100)) for f in args.split)}, seed {args.seed}, "
        f"input {args.img_size[0]}x{args.img_size[1]}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.pack_resume:
        print(f"Packed {pack_carryover(Path(args.out))}")
        return
    train(args)


if __name__ == "__main__":
    main()
