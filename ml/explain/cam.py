"""Class activation maps (CAM, Zhou et al. 2016) from the forward pass, where they equal Grad-CAM.

When the feature map reaches the softmax head only through global average pooling, dropout and one
dense layer, a class logit is `b_k + sum_c W_ck * mean_ij F_ijc`. Its gradient with respect to
F_ijc is `W_ck / (h w)` at every position, so Grad-CAM's channel weights (the spatially averaged
gradients) are the dense kernel's column divided by h w, and Grad-CAM's map is the feature map times
that column: no gradient tape is needed. `cam_head` recognises that architecture from the model's
graph when the model is loaded; `cam_function` computes probabilities, logits, maps and the pooled
features (the image embedding the worker stores, `worker.similarity`) in one forward pass plus one
matrix product. Any other head keeps the tape (`ml.explain.gradcam`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import keras
import tensorflow as tf

# model -> {layer name: tf.function}; weak so that dropping a model frees its graphs.
_FUNCTION_CACHE: weakref.WeakKeyDictionary[keras.Model, dict] = weakref.WeakKeyDictionary()

# Layers that pass a pooled vector on unchanged at inference.
_IDENTITY_AT_INFERENCE = (keras.layers.Dropout, keras.layers.GaussianDropout, keras.layers.GaussianNoise)


def _inputs_of(layer) -> list:
    try:
        return keras.tree.flatten(layer.input)
    except (AttributeError, ValueError):  # a layer called several times has no single input
        return []


def _only_consumer(model: keras.Model, tensor):
    """The one layer of `model` that reads `tensor` as its only input, else None."""
    readers = [layer for layer in model.layers if any(t is tensor for t in _inputs_of(layer))]
    if len(readers) != 1 or len(_inputs_of(readers[0])) != 1:
        return None
    return readers[0]


def _is_global_average(layer) -> bool:
    return (
        isinstance(layer, keras.layers.GlobalAveragePooling2D)
        and layer.data_format == "channels_last"
        and not layer.keepdims
    )


def _is_softmax_dense(layer) -> bool:
    activation = getattr(layer, "activation", None)
    return isinstance(layer, keras.layers.Dense) and getattr(activation, "__name__", "") == "softmax"


def cam_head(model: keras.Model, feature_layer: keras.layers.Layer) -> keras.layers.Dense | None:
    """The softmax dense layer whose kernel turns `feature_layer`'s map into Grad-CAM, or None.

    The identity holds when the feature map's only reader is a channels-last global average
    pooling, followed only by layers that are the identity at inference (dropout), then a dense
    softmax layer whose output is the model's single output.
    """
    if len(model.outputs) != 1:
        return None
    layer = _only_consumer(model, feature_layer.output)
    if layer is None or not _is_global_average(layer):
        return None
    while True:
        layer = _only_consumer(model, layer.output)
        if layer is None or not isinstance(layer, _IDENTITY_AT_INFERENCE):
            break
    if layer is None or not _is_softmax_dense(layer) or layer.output is not model.outputs[0]:
        return None
    return layer


def exact_method(model: keras.Model, feature_layer: keras.layers.Layer) -> str:
    """How Grad-CAM of `feature_layer` is computed exactly: "forward" (this module's CAM) where
    `cam_head` finds the pooling-dropout-dense head, else "tape" (a gradient tape)."""
    return "forward" if cam_head(model, feature_layer) is not None else "tape"


def upsample_and_normalise(cam: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """Bilinear resize to `size` (H, W), then divide each map by its maximum (zeros stay zeros)."""
    cam = tf.image.resize(cam[..., tf.newaxis], size, method="bilinear")[..., 0]
    cam = tf.nn.relu(cam)
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    return tf.math.divide_no_nan(cam, peak)


def map_pass_signature(model: keras.Model) -> list[tf.TensorSpec]:
    """The inputs of a compiled map pass (forward CAM or tape Grad-CAM): images at the model's input
    size, one class per image and the decision's per-class offsets."""
    height, width = (int(d) for d in model.input_shape[1:3])
    return [
        tf.TensorSpec((None, height, width, 3), tf.float32, name="images"),
        tf.TensorSpec((None,), tf.int32, name="class_indices"),
        tf.TensorSpec((None,), tf.float32, name="class_offsets"),
    ]


def _build_cam_function(model: keras.Model, feature_layer: keras.layers.Layer, head: keras.layers.Dense):
    both = keras.Model(model.inputs, [feature_layer.output, model.outputs[0]], name=f"{model.name}_cam")
    height, width = (int(d) for d in model.input_shape[1:3])

    @tf.function(input_signature=map_pass_signature(model))
    def cam(images, class_indices, class_offsets):
        features, probs = both(images, training=False)
        features, probs = tf.cast(features, tf.float32), tf.cast(probs, tf.float32)
        kernel = tf.cast(head.kernel, tf.float32)
        pooled = tf.reduce_mean(features, axis=(1, 2))
        logits = tf.matmul(pooled, kernel)
        if head.use_bias:
            logits = logits + tf.cast(head.bias, tf.float32)
        # The decided class, as in the tape-based pass: argmax of log p plus the decision's offsets.
        predicted = tf.argmax(probs * tf.exp(class_offsets), axis=-1, output_type=tf.int32)
        targets = tf.where(class_indices < 0, predicted, class_indices)
        # Grad-CAM's weights: the gradient of the logit, W_ck / (h w), averaged over the positions.
        positions = tf.cast(tf.shape(features)[1] * tf.shape(features)[2], tf.float32)
        weights = tf.gather(tf.transpose(kernel), targets) / positions
        maps = tf.nn.relu(tf.einsum("nhwc,nc->nhw", features, weights))
        # `pooled` is the global average pooling's output (the only reader of the feature map): the
        # embedding, handed out so that no second pass computes it.
        return probs, logits, targets, upsample_and_normalise(maps, (height, width)), pooled

    return cam


def cam_function(
    model: keras.Model, feature_layer: keras.layers.Layer
) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, ...]]:
    """The cached, compiled forward CAM pass, with the signature and outputs of
    `ml.explain.gradcam.gradcam_function`.

    Raises:
        ValueError: if the model's head after `feature_layer` is not pooling, dropout and a dense
            softmax, where CAM would not equal Grad-CAM.
    """
    per_model = _FUNCTION_CACHE.setdefault(model, {})
    if feature_layer.name not in per_model:
        head = cam_head(model, feature_layer)
        if head is None:
            raise ValueError(
                f"CAM equals Grad-CAM only when layer {feature_layer.name!r} reaches a dense softmax output "
                f"through global average pooling and dropout alone; model {model.name!r} has another head."
            )
        per_model[feature_layer.name] = _build_cam_function(model, feature_layer, head)
    return per_model[feature_layer.name]
