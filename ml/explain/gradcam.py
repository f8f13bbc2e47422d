"""Grad-CAM and Grad-CAM++ computed in the same forward pass as the prediction.

One `keras.Model(inputs, [feature_map, probabilities, head_input, pooled])` is built per (model, layer) and
wrapped in a `tf.function` with a fixed input signature, so a batch costs one forward pass under a
gradient tape plus a backward pass from the class score to the feature map only (the backbone below
the feature map is never differentiated). The functions are cached per model object, so a worker
that keeps its model loaded traces them once.

When the model ends in a softmax (a `Dense(..., activation="softmax")` or an `Activation("softmax")`
layer), the class score that is differentiated is the pre-softmax logit, as in Selvaraju et al.
(2017): the gradient of a saturated probability vanishes and would give empty maps for confident
predictions. The logit is recomputed from the head's input inside the same pass; the probabilities
returned are the model's own output tensor. The pass also hands out the pooled image embedding
(`ml.model.EMBEDDING_LAYER`, the features the classifier reads), which the worker stores
(`worker.similarity`): no second forward pass computes it.

For a head of global average pooling, dropout and a dense softmax (ours), Grad-CAM equals the class
activation map of the dense kernel, which needs no tape: `predict_with_gradcam` and `explain_gradcam`
then compute it in the forward pass (`ml.explain.cam`; `map_method` says which applies).

Typical use::

    probs, maps = predict_with_gradcam(model, batch, "cbam_top_spatial")
    result = explain_gradcam(predictor, [uint8_rgb_image])   # calibrated, maps at original size
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import cv2
import keras
import numpy as np
import tensorflow as tf

from ml.calibration import calibrated_softmax as calibrate
from ml.explain.cam import cam_function, exact_method, map_pass_signature, upsample_and_normalise
from ml.model import EMBEDDING_LAYER

if TYPE_CHECKING:
    from ml.predictor import Predictor

# model -> {(layer_name, plus_plus): tf.function}; weak so that dropping a model frees its graphs.
_FUNCTION_CACHE: weakref.WeakKeyDictionary[keras.Model, dict] = weakref.WeakKeyDictionary()


class GradCamExplanation(NamedTuple):
    """Result of `explain_gradcam`.

    Attributes:
        probs: (N, C) float32 calibrated class probabilities.
        class_indices: (N,) int, the class each map explains.
        maps: list of N float32 arrays in [0, 1], each at its original image's height and width.
        embeddings: (N, D) float32 pooled features from the same pass (D = 0 for a model without
            a pooled embedding layer).
    """

    probs: np.ndarray
    class_indices: np.ndarray
    maps: list
    embeddings: np.ndarray


def _output_rank(layer) -> int:
    """Rank of a layer's symbolic output, 0 when it has none or several."""
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):
        return 0


def last_feature_layer(model: keras.Model) -> str:
    """Name of the last layer whose output is a 4-D (batch, h, w, channels) feature map.

    Raises:
        ValueError: if the model has no such layer.
    """
    for layer in reversed(model.layers):
        if _output_rank(layer) == 4 and not isinstance(layer, keras.layers.InputLayer):
            return layer.name
    raise ValueError(f"Model {model.name!r} has no layer with a 4-D output to compute Grad-CAM from.")


def _feature_layer(model: keras.Model, layer_name: str | None) -> keras.layers.Layer:
    if layer_name is None:
        layer_name = last_feature_layer(model)
    try:
        layer = model.get_layer(layer_name)
    except ValueError:
        names = [layer.name for layer in model.layers if _output_rank(layer) == 4][-5:]
        raise ValueError(
            f"Model {model.name!r} has no layer named {layer_name!r}; its last feature-map layers are {names}."
        ) from None
    if _output_rank(layer) != 4:
        raise ValueError(
            f"Layer {layer_name!r} does not output a single 4-D (batch, height, width, channels) "
            "feature map, which Grad-CAM needs."
        )
    return layer


def _softmax_head(model: keras.Model):
    """The final layer when it applies a softmax (so logits can be recomputed), else None."""
    head = model.layers[-1]
    activation = getattr(head, "activation", None)
    if getattr(activation, "__name__", "") != "softmax":
        return None
    if isinstance(head, (keras.layers.Dense, keras.layers.Activation)):
        return head
    return None


def _pooled_tensor(model: keras.Model):
    """The pooled embedding's tensor (`EMBEDDING_LAYER`), or None for a model without that layer."""
    try:
        return model.get_layer(EMBEDDING_LAYER).output
    except ValueError:
        return None


def _head_logits(head, head_input):
    """Pre-softmax logits of the head layer, from the tensor that entered it."""
    x = tf.cast(head_input, tf.float32)
    if isinstance(head, keras.layers.Activation):
        return x
    logits = tf.matmul(x, tf.cast(head.kernel, tf.float32))
    if head.use_bias:
        logits = logits + tf.cast(head.bias, tf.float32)
    return logits


def _weighted_map(features, grads, plus_plus: bool):
    """ReLU of the gradient-weighted sum over channels, shape (N, h, w)."""
    if plus_plus:
        # Chattopadhay et al. (2018), closed form for an exponential of the score; the exp factor
        # is a positive per-image constant and cancels in alpha and in the final normalisation.
        grads_2 = tf.square(grads)
        grads_3 = grads_2 * grads
        sum_activations = tf.reduce_sum(features, axis=(1, 2), keepdims=True)
        denominator = 2.0 * grads_2 + sum_activations * grads_3
        alphas = tf.math.divide_no_nan(grads_2, denominator)  # 0 where the gradient is 0
        weights = tf.reduce_sum(alphas * tf.nn.relu(grads), axis=(1, 2))
    else:
        weights = tf.reduce_mean(grads, axis=(1, 2))
    cam = tf.einsum("nhwc,nc->nhw", features, weights)
    return tf.nn.relu(cam)


def _build_gradcam_function(model: keras.Model, layer_name: str | None, plus_plus: bool):
    feature_layer = _feature_layer(model, layer_name)
    head = _softmax_head(model)
    pooled_tensor = _pooled_tensor(model)
    outputs = [feature_layer.output, model.output, head.input if head is not None else None, pooled_tensor]
    grad_model = keras.Model(model.inputs, [t for t in outputs if t is not None], name=f"{model.name}_gradcam")
    height, width = (int(d) for d in model.input_shape[1:3])

    @tf.function(input_signature=map_pass_signature(model))
    def gradcam(images, class_indices, class_offsets):
        with tf.GradientTape() as tape:
            features, probs, *rest = grad_model(images, training=False)
            features, probs = tf.cast(features, tf.float32), tf.cast(probs, tf.float32)
            head_input = rest.pop(0) if head is not None else None
            # Without a softmax head to undo, the probability itself is the differentiated score.
            logits = _head_logits(head, head_input) if head is not None else tf.math.log(probs + 1e-12)
            # The served decision: argmax of log p plus a per-class offset (ml.decision), computed as
            # p * exp(offset) so that zero offsets give exactly the plain argmax.
            predicted = tf.argmax(probs * tf.exp(class_offsets), axis=-1, output_type=tf.int32)
            targets = tf.where(class_indices < 0, predicted, class_indices)
            scores = tf.gather(logits if head is not None else probs, targets, axis=1, batch_dims=1)
        grads = tape.gradient(scores, features)
        cam = _weighted_map(features, grads, plus_plus)
        maps = upsample_and_normalise(cam, (height, width))
        pooled = tf.cast(rest[0], tf.float32) if pooled_tensor is not None else tf.zeros((tf.shape(images)[0], 0))
        return probs, logits, targets, maps, pooled

    return gradcam


def gradcam_function(
    model: keras.Model, layer_name: str | None = None, plus_plus: bool = False
) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, ...]]:
    """The cached, compiled Grad-CAM pass for `model`.

    Args:
        model: a Keras model taking (N, H, W, 3) float images with a fixed H and W.
        layer_name: the feature-map layer; None picks the last layer with a 4-D output.
        plus_plus: Grad-CAM++ weights instead of averaged gradients.

    Returns:
        A `tf.function` `(images float32 (N, H, W, 3), class_indices int32 (N,), class_offsets
        float32 (C,)) -> (probs (N, C), logits (N, C), targets (N,), maps (N, H, W), pooled (N, D))`,
        where a class index of -1 means the predicted class, argmax(log p + class_offsets), and
        pooled is the `EMBEDDING_LAYER` output (D = 0 without that layer). Its input signature is
        fixed, so it is traced once.

    Raises:
        ValueError: if the layer does not exist or is not a 4-D feature map.
    """
    per_model = _FUNCTION_CACHE.setdefault(model, {})
    key = (layer_name, bool(plus_plus))
    if key not in per_model:
        per_model[key] = _build_gradcam_function(model, layer_name, plus_plus)
    return per_model[key]


def _as_batch(model: keras.Model, images) -> np.ndarray:
    batch = np.asarray(images, dtype=np.float32)
    expected = tuple(int(d) for d in model.input_shape[1:4])
    if batch.ndim == 3:
        batch = batch[np.newaxis]
    if batch.ndim != 4 or batch.shape[1:] != expected:
        raise ValueError(
            f"Images must be shaped (N, {expected[0]}, {expected[1]}, {expected[2]}) for this model, "
            f"got {batch.shape}; resize them to the model's input size first."
        )
    return batch


def _class_targets(class_index, n: int, num_classes: int) -> np.ndarray:
    """Per-image target classes as int32, -1 meaning 'the predicted class'."""
    if class_index is None:
        return np.full(n, -1, dtype=np.int32)
    targets = np.asarray(class_index)
    if targets.dtype == bool or not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"Class indices must be integers, got {class_index!r}.")
    if targets.ndim == 0:
        targets = np.full(n, int(targets))
    elif targets.shape != (n,):
        raise ValueError(f"Got {targets.size} class indices for {n} images; give one per image or a single one.")
    bad = targets[(targets < -1) | (targets >= num_classes)]
    if bad.size:
        raise ValueError(f"Class index {int(bad[0])} is out of range for a model with {num_classes} classes.")
    return targets.astype(np.int32)


MAP_METHODS = ("auto", "forward", "tape")


def map_method(model: keras.Model, layer_name: str | None = None, plus_plus: bool = False) -> str:
    """How a Grad-CAM map of `model` is computed exactly: "forward" (the class activation map from the
    dense kernel, `ml.explain.cam`, equal to Grad-CAM for a pooling-dropout-dense head) or "tape"
    (a gradient tape; always for Grad-CAM++, whose weights use the gradients' powers).

    Raises:
        ValueError: if the layer does not exist or is not a 4-D feature map.
    """
    if plus_plus:
        return "tape"
    # Cached per model, like its passes: finding the head walks every layer (~1 ms a batch in the worker).
    per_model = _FUNCTION_CACHE.setdefault(model, {})
    key = ("method", layer_name)
    if key not in per_model:
        per_model[key] = exact_method(model, _feature_layer(model, layer_name))
    return per_model[key]


def map_function(model: keras.Model, layer_name: str | None, plus_plus: bool, method: str = "auto"):
    """The compiled pass `method` names ("auto": `map_method`), with `gradcam_function`'s signature.

    Raises:
        ValueError: for an unknown method, "forward" with Grad-CAM++ or where CAM is not Grad-CAM.
    """
    if method not in MAP_METHODS:
        raise ValueError(f"method must be one of {MAP_METHODS}, got {method!r}.")
    if method == "auto":
        method = map_method(model, layer_name, plus_plus)
    if method == "tape":
        return gradcam_function(model, layer_name, plus_plus)
    if plus_plus:
        raise ValueError("Grad-CAM++ needs the gradient tape (method='tape' or 'auto').")
    return cam_function(model, _feature_layer(model, layer_name))


def _run_gradcam(model, images, layer_name, class_index, plus_plus, batch_size, class_offsets=None, method="auto"):
    """(probs, logits, targets, maps, pooled) as NumPy arrays, processed in chunks of `batch_size`."""
    batch = _as_batch(model, images)
    num_classes = int(model.output.shape[-1])
    targets = _class_targets(class_index, len(batch), num_classes)
    offsets = np.zeros(num_classes, np.float32) if class_offsets is None else np.asarray(class_offsets, np.float32)
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    fn = map_function(model, layer_name, plus_plus, method)
    parts = [
        fn(tf.constant(batch[i : i + batch_size]), tf.constant(targets[i : i + batch_size]), tf.constant(offsets))
        for i in range(0, len(batch), batch_size)
    ]
    return tuple(np.concatenate([p[k].numpy() for p in parts]) for k in range(5))


def predict_with_gradcam(
    model: keras.Model,
    images: np.ndarray,
    layer_name: str | None = None,
    class_index: int | Sequence[int] | None = None,
    plus_plus: bool = False,
    batch_size: int = 32,
    method: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and Grad-CAM maps from one forward pass.

    Args:
        model: Keras classifier taking float images at its input size (0-255 for our models).
        images: (N, H, W, 3) or (H, W, 3) array at the model's input size.
        layer_name: feature-map layer (e.g. `gradcam_layer_name(config)`); None picks the last 4-D layer.
        class_index: None for each image's predicted class, an int for the same class for all
            images, or a sequence of N ints (one target per image).
        plus_plus: use Grad-CAM++ weights.
        batch_size: images per compiled call.
        method: "auto" (`map_method`: the forward CAM where it equals Grad-CAM, else the tape),
            "forward" or "tape".

    Returns:
        `(probs, maps)`: probs (N, C) float32, the model's own (uncalibrated) output; maps
        (N, H, W) float32 in [0, 1] at the model's input size (all zeros when no position
        supports the class).

    Raises:
        ValueError: for images of the wrong shape, unknown layers, out-of-range classes, or
            method="forward" on a model where CAM is not Grad-CAM.
    """
    probs, _, _, maps, _ = _run_gradcam(model, images, layer_name, class_index, plus_plus, batch_size, method=method)
    return probs, maps


def resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D map to `size` = (height, width)."""
    h, w = size
    if values.shape == (h, w):
        return values.astype(np.float32, copy=True)
    return cv2.resize(values.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


def class_indices_from_names(
    class_names: Sequence[str], requested: str | Sequence[str | None] | None, n: int
) -> list[int] | None:
    """Map None, one class name, or one name (or None) per image to a gradcam `class_index` value.

    Raises:
        ValueError: for names the model does not know or a list of the wrong length.
    """
    if requested is None:
        return None
    if isinstance(requested, str):
        requested = [requested] * n
    if len(requested) != n:
        raise ValueError(f"Got {len(requested)} class names for {n} images; give one per image or a single one.")
    indices = []
    for name in requested:
        if name is None:
            indices.append(-1)
        elif name in class_names:
            indices.append(list(class_names).index(name))
        else:
            raise ValueError(f"Unknown class {name!r}; this model's classes are {list(class_names)}.")
    return indices


def predictor_temperature(predictor: Predictor) -> float:
    """The calibration temperature a Predictor applies (attribute first, then its manifest)."""
    temperature = getattr(predictor, "temperature", None)
    if temperature is None:
        temperature = predictor.manifest.get("temperature", 1.0)
    return float(temperature)


def predictor_layer(predictor: Predictor) -> str | None:
    """The Grad-CAM layer a Predictor declares (attribute first, then its manifest)."""
    return getattr(predictor, "gradcam_layer", None) or predictor.manifest.get("gradcam_layer")


def explain_gradcam(
    predictor: Predictor,
    images: Sequence[np.ndarray],
    class_names: str | Sequence[str | None] | None = None,
    plus_plus: bool = False,
    batch_size: int = 16,
    method: str = "auto",
) -> GradCamExplanation:
    """Calibrated probabilities and Grad-CAM maps at each image's original size, in one pass.

    Args:
        predictor: an `ml.Predictor` (uses `.model`, `.preprocess`, `.class_names`,
            `.gradcam_layer` and its temperature, `.temperature` or `.manifest['temperature']`).
        images: list of HxWx3 uint8 RGB arrays of any size.
        class_names: None for each image's top class (the predictor's decision), one class name for all images, or a
            list with one name (or None) per image.
        plus_plus: use Grad-CAM++ weights.
        batch_size: images per compiled call.
        method: "auto", "forward" or "tape", as in `predict_with_gradcam`.

    Returns:
        A `GradCamExplanation(probs, class_indices, maps, embeddings)`; probs are temperature-scaled
        exactly like `predictor.predict` (the argmax is unchanged by the temperature).

    Raises:
        ValueError: for an empty image list, unknown class names, or images that
            `predictor.preprocess` rejects (not HxWx3 uint8).
    """
    if len(images) == 0:
        raise ValueError("explain_gradcam needs at least one image.")
    batch = np.stack([predictor.preprocess(image) for image in images]).astype(np.float32)
    class_index = class_indices_from_names(predictor.class_names, class_names, len(images))
    temperature = predictor_temperature(predictor)
    decision = getattr(predictor, "decision", None)
    offsets = decision.offsets_for_raw(temperature, len(predictor.class_names)) if decision is not None else None
    _, logits, targets, maps, pooled = _run_gradcam(
        predictor.model, batch, predictor_layer(predictor), class_index, plus_plus, batch_size, offsets, method
    )
    probs = calibrate(logits, temperature)
    resized = [np.clip(resize_map(m, np.shape(img)[:2]), 0.0, 1.0) for m, img in zip(maps, images)]
    return GradCamExplanation(probs, targets.astype(np.int64), resized, pooled.astype(np.float32))
