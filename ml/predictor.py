"""`Predictor`: a model artifact folder turned into calibrated probabilities for RGB arrays.

The worker builds one Predictor per process (after the fork) and calls `predict` per job; the
explanations code reaches the Keras model and its Grad-CAM layer through `model` and
`gradcam_layer`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import h5py
import keras
import numpy as np
import tensorflow as tf

from ml.artifact import MODEL_WEIGHT_GROUPS, WEIGHTS, build_manifest, convert_weights_file, read_manifest, weights_dtype
from ml.calibration import apply_temperature
from ml.data import resize_image
from ml.decision import Decision
from ml.explain.cam import exact_method
from ml.metadata import MISSING_METADATA, MetadataHead
from ml.model import EMBEDDING_LAYER, ModelConfig, build_model

DEFAULT_UNTRAINED_SIZE = (120, 160)
UNTRAINED_SEED = 1234


class Predictor:
    """Calibrated class probabilities from a model artifact.

    Build one with `Predictor.load(folder)`, `Predictor.untrained(...)` or
    `Predictor.load_default(folder)`, not with the constructor.

    Attributes:
        manifest: the artifact's manifest dict.
        model: the Keras model (float32 softmax output, 0-255 RGB input).
        class_names: class names in output order.
        input_size: (H, W) the model expects.
        temperature: the calibration temperature applied to every prediction.
        decision: how the top class is chosen from the calibrated probabilities (`ml.decision`).
        gradcam_layer: name of the layer whose feature map Grad-CAM uses.
        gradcam_method: how the prediction pass computes that Grad-CAM exactly, read from the
            architecture at load time (`ml.explain.cam.exact_method`): "forward" (the class activation
            map from the dense kernel, no gradient tape) or "tape".
    """

    def __init__(self, model, manifest: dict, batch_size: int = 16):
        self.model = model
        self.manifest = manifest
        self.class_names = list(manifest["class_names"])
        self.input_size = (int(manifest["input_size"][0]), int(manifest["input_size"][1]))
        self.temperature = float(manifest["temperature"])
        self.decision = Decision.from_manifest(manifest)
        self.metadata_head: MetadataHead | None = None  # set by `load` when the artifact ships one
        self.gradcam_layer = manifest["gradcam_layer"]
        self.gradcam_method = exact_method(model, model.get_layer(self.gradcam_layer))
        self.batch_size = batch_size
        h, w = self.input_size
        # One traced graph for every batch size: retracing per call would cost seconds each job.
        self._forward = tf.function(
            lambda x: model(x, training=False),
            input_signature=[tf.TensorSpec((None, h, w, 3), tf.float32)],
            reduce_retracing=True,
        )
        self._embed = None  # built on first use: most processes never need the embedding

    # ----------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------

    @classmethod
    def load(cls, folder: str | os.PathLike, batch_size: int = 16) -> Predictor:
        """Rebuilds the model described by `folder/manifest.json` and loads its weights.

        Args:
            folder: an artifact or finished training-run folder.
            batch_size: images per forward pass inside `predict`.

        Returns:
            The Predictor.

        Raises:
            FileNotFoundError: if the folder, manifest or weights are missing.
            ValueError: if the manifest is invalid or the weights do not fit the architecture.
        """
        folder = Path(folder)
        manifest = read_manifest(folder)
        weights = folder / WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"Model folder {str(folder)!r} has no {WEIGHTS}.")
        config = ModelConfig.from_dict(manifest["architecture"])
        # The weights file holds the trained backbone: never fetch or read the backbone's own.
        config.weights = "none"
        model = build_model(config)
        _load_weights(model, weights)
        predictor = cls(model, manifest, batch_size)
        predictor.metadata_head = MetadataHead.from_artifact(folder, manifest)
        return predictor

    @classmethod
    def untrained(cls, input_size: tuple[int, int] = DEFAULT_UNTRAINED_SIZE, seed: int = UNTRAINED_SEED) -> Predictor:
        """EfficientNetB3+CBAM with random (seeded) weights, for development without a trained model.

        Raises:
            ValueError: for an input size the model cannot take.
        """
        config = ModelConfig(input_size=tuple(int(s) for s in input_size), weights="none", seed=seed)
        model = build_model(config)
        manifest = build_manifest(config, version="untrained", trained=False)
        return cls(model, manifest)

    @classmethod
    def load_default(cls, model_dir: str | os.PathLike | None) -> Predictor:
        """`load(model_dir)` when it has a manifest.json, else `untrained()`.

        The untrained input size comes from UNTRAINED_INPUT_SIZE ("H,W") when set.

        Raises:
            ValueError: for a malformed UNTRAINED_INPUT_SIZE, or as `load`.
        """
        if model_dir and (Path(model_dir) / "manifest.json").is_file():
            return cls.load(model_dir)
        return cls.untrained(input_size=untrained_input_size())

    # ----------------------------------------------------------------------------------------
    # Inference
    # ----------------------------------------------------------------------------------------

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """One HxWx3 uint8 RGB array -> float32 (H, W, 3) in 0-255 at the model's input size.

        Raises:
            ValueError: if the array is not HxWx3 uint8.
        """
        return resize_image(_as_rgb_uint8(image), self.input_size).astype(np.float32)

    def predict(self, images: Sequence[np.ndarray] | np.ndarray, tta: bool = False) -> np.ndarray:
        """Calibrated probabilities, softmax(log p / T), for a list of RGB uint8 arrays.

        Args:
            images: list of HxWx3 uint8 RGB arrays of any size (or one (N, H, W, 3) array).
            tta: also predict the horizontally, vertically and doubly flipped images and average
                the (uncalibrated) probabilities before temperature scaling.

        Returns:
            (N, C) float32 array; rows sum to one.

        Raises:
            ValueError: if an image is not HxWx3 uint8.
        """
        batch = np.stack([self.preprocess(im) for im in images]) if len(images) else None
        if batch is None:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        return apply_temperature(self.predict_raw(batch, tta=tta), self.temperature)

    def predict_with_metadata(
        self, images: Sequence[np.ndarray], metadata: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Calibrated probabilities, the chosen class of each image, and whether its metadata was used
        (`with_metadata` on the network's answer)."""
        return self.with_metadata(self.predict(images), metadata)

    def predict_with_embedding(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities (as `predict`) and the pooled embeddings of RGB uint8 arrays, from
        the same forward pass: (N, C) and (N, D) float32.

        Raises:
            ValueError: if an image is not HxWx3 uint8.
        """
        if not len(images):
            return np.zeros((0, len(self.class_names)), np.float32), np.zeros((0, 0), np.float32)
        pooled, raw = self.embed_and_predict_raw(np.stack([self.preprocess(im) for im in images]))
        return apply_temperature(raw, self.temperature), pooled

    def with_metadata(self, probs: np.ndarray, metadata: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The answer given the network's calibrated probabilities and each image's metadata features
        (`ml.metadata.metadata_vector` rows): (probabilities, chosen class indices, metadata used).

        An image whose metadata is all missing keeps the network's answer: the metadata head without
        metadata validates worse than the network alone.
        """
        probs = np.array(probs, dtype=np.float32)
        chosen = self.decision.choose(probs)
        used = np.zeros(len(probs), dtype=bool)
        if self.metadata_head is None or not len(probs):
            return probs, chosen, used
        metadata = np.asarray(metadata, dtype=np.float32)
        used = ~np.all(metadata == MISSING_METADATA, axis=1)
        if used.any():
            probs[used] = self.metadata_head.probabilities(probs[used], metadata[used])
            chosen[used] = self.metadata_head.decision.choose(probs[used])
        return probs, chosen, used

    def top_classes(self, probs: np.ndarray) -> list[str]:
        """The class each row of calibrated probabilities is shown as (the manifest's decision)."""
        return [self.class_names[i] for i in self.decision.choose(probs)]

    def predict_raw(self, batch: np.ndarray, tta: bool = False) -> np.ndarray:
        """Uncalibrated softmax output for already preprocessed (N, H, W, 3) float32 images."""
        views = [batch]
        if tta:
            views += [batch[:, :, ::-1], batch[:, ::-1, :], batch[:, ::-1, ::-1]]
        return np.mean([self._forward_batched(np.ascontiguousarray(v)) for v in views], axis=0)

    def embed_and_predict_raw(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pooled image embedding (the `avg_pool` output) and the uncalibrated softmax output of
        preprocessed (N, H, W, 3) float32 images, from one forward pass."""
        if self._embed is None:
            both = keras.Model(self.model.inputs, [self.model.get_layer(EMBEDDING_LAYER).output, self.model.outputs[0]])
            h, w = self.input_size
            self._embed = tf.function(
                lambda x: both(x, training=False),
                input_signature=[tf.TensorSpec((None, h, w, 3), tf.float32)],
                reduce_retracing=True,
            )
        parts = [self._embed(batch[i : i + self.batch_size]) for i in range(0, len(batch), self.batch_size)]
        if not parts:
            return np.zeros((0, 0), np.float32), np.zeros((0, len(self.class_names)), np.float32)
        return (
            np.concatenate([e.numpy() for e, _ in parts]).astype(np.float32),
            np.concatenate([p.numpy() for _, p in parts]).astype(np.float32),
        )

    def _forward_batched(self, batch: np.ndarray) -> np.ndarray:
        out = [self._forward(batch[i : i + self.batch_size]).numpy() for i in range(0, len(batch), self.batch_size)]
        return np.concatenate(out).astype(np.float32)

    def __repr__(self) -> str:
        m = self.manifest
        return f"Predictor(name={m['name']!r}, version={m['version']!r}, input_size={self.input_size})"


def untrained_input_size() -> tuple[int, int]:
    """(H, W) from the environment variable UNTRAINED_INPUT_SIZE, default 120,160.

    Raises:
        ValueError: if the variable is not "H,W" with two integers.
    """
    raw = os.environ.get("UNTRAINED_INPUT_SIZE", "").strip()
    if not raw:
        return DEFAULT_UNTRAINED_SIZE
    try:
        h, w = (int(part) for part in raw.replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"UNTRAINED_INPUT_SIZE must look like 'H,W' (e.g. '120,160'), got {raw!r}.") from None
    return h, w


def _as_rgb_uint8(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        raise ValueError(f"Expected an HxWx3 RGB image, got a grayscale array of shape {image.shape}.")
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]  # RGBA from a PNG: the alpha channel carries no lesion information
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"Expected an HxWx3 RGB image, got shape {image.shape}.")
    if image.dtype != np.uint8:
        raise ValueError(f"Expected a uint8 image with values 0-255, got dtype {image.dtype}.")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"Image has no pixels (shape {image.shape}).")
    return image


def _load_weights(model, path: Path) -> None:
    """load_weights, converting float16-stored weights to float32 first.

    Keras matches a weights file to the model by layer order and type and silently ignores what
    does not fit, so the file's variable shapes are compared with the model's first.
    """
    _check_weight_shapes(model, path)
    try:
        if weights_dtype(path) == "float32":
            model.load_weights(path)
            return
        with tempfile.TemporaryDirectory() as tmp:  # float16 on disk: Keras assigns arrays as stored
            f32 = Path(tmp) / WEIGHTS
            convert_weights_file(path, f32, "float32")
            model.load_weights(f32)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"Weights {str(path)!r} do not match the architecture in the manifest: {exc}") from exc


def _check_weight_shapes(model, path: Path) -> None:

    stored: list[tuple] = []
    with h5py.File(path, "r") as f:
        for group in MODEL_WEIGHT_GROUPS:  # a run's file may also hold optimizer state: not ours
            if group in f:
                f[group].visititems(lambda _, o: stored.append(tuple(o.shape)) if isinstance(o, h5py.Dataset) else None)
    expected = [tuple(w.shape) for w in model.weights]
    if sorted(stored) != sorted(expected):
        raise ValueError(
            f"Weights {str(path)!r} do not match the architecture in the manifest: the file holds "
            f"{len(stored)} arrays, the model {len(expected)} variables (or their shapes differ)."
        )
