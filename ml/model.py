"""EfficientNetB3 + CBAM classifier, built as one flat Keras functional graph.

The backbone comes from `keras.applications` with our input tensor, so its layers become layers
of our model (no nested sub-model): Grad-CAM can then reach any inner feature map by name.
Preprocessing lives inside the model (EfficientNet expects 0-255 RGB pixels).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, TypeAlias

import keras
import numpy as np
from keras import layers, ops
from numpy.typing import ArrayLike

CLASS_NAMES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
CLASS_LONG_NAMES = {
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}
MALIGNANT_CLASSES = ("akiec", "bcc", "mel")
# EfficientNetB3 has seven stages; names of its blocks start with "block<stage>".
BACKBONE_STAGES = (1, 2, 3, 4, 5, 6, 7)
TOP_FEATURE_LAYER = "top_activation"
CBAM_TOP_LAYER = "cbam_top_spatial"
EMBEDDING_LAYER = "avg_pool"  # the pooled 1536-d image embedding the classifier reads
# What Keras hands a layer: a backend tensor (tf.Tensor on TensorFlow) or, while building, a KerasTensor.
Tensor: TypeAlias = Any


@keras.saving.register_keras_serializable(package="dermportal")
class ChannelAttention(layers.Layer):
    """CBAM channel attention: a shared MLP over average- and max-pooled channel descriptors.

    Args:
        ratio: reduction ratio of the shared MLP's hidden layer.
    """

    def __init__(self, ratio: int = 8, **kwargs):
        super().__init__(**kwargs)
        if ratio < 1:
            raise ValueError(f"ChannelAttention ratio must be at least 1, got {ratio}.")
        self.ratio = ratio

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        channels = int(input_shape[-1])
        hidden = max(channels // self.ratio, 1)
        self.mlp_hidden = layers.Dense(hidden, activation="relu", name="mlp_hidden")
        self.mlp_out = layers.Dense(channels, name="mlp_out")
        self.mlp_hidden.build((None, channels))
        self.mlp_out.build((None, hidden))
        super().build(input_shape)

    def attention(self, x: Tensor) -> Tensor:
        """Per-channel weights in (0, 1), shaped (batch, 1, 1, channels)."""
        avg = self.mlp_out(self.mlp_hidden(ops.mean(x, axis=(1, 2))))
        mx = self.mlp_out(self.mlp_hidden(ops.max(x, axis=(1, 2))))
        weights = ops.sigmoid(avg + mx)
        return ops.expand_dims(ops.expand_dims(weights, 1), 1)

    def call(self, x: Tensor) -> Tensor:
        return x * ops.cast(self.attention(x), x.dtype)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "ratio": self.ratio}


@keras.saving.register_keras_serializable(package="dermportal")
class SpatialAttention(layers.Layer):
    """CBAM spatial attention: a k x k convolution over the channel-wise average and max maps.

    Args:
        kernel_size: side of the square convolution (7 in the CBAM paper).
    """

    def __init__(self, kernel_size: int = 7, **kwargs):
        super().__init__(**kwargs)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"SpatialAttention kernel_size must be odd and positive, got {kernel_size}.")
        self.kernel_size = kernel_size

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self.conv = layers.Conv2D(1, self.kernel_size, padding="same", activation="sigmoid", name="conv")
        self.conv.build((None, None, None, 2))
        super().build(input_shape)

    def attention(self, x: Tensor) -> Tensor:
        """Per-position weights in (0, 1), shaped (batch, height, width, 1)."""
        avg = ops.mean(x, axis=-1, keepdims=True)
        mx = ops.max(x, axis=-1, keepdims=True)
        return self.conv(ops.concatenate([avg, mx], axis=-1))

    def call(self, x: Tensor) -> Tensor:
        return x * ops.cast(self.attention(x), x.dtype)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "kernel_size": self.kernel_size}


def cbam_block(x: keras.KerasTensor, name: str, ratio: int = 8, kernel_size: int = 7) -> keras.KerasTensor:
    """Channel then spatial attention (Woo et al., 2018), each a named layer of the graph."""
    x = ChannelAttention(ratio, name=f"{name}_channel")(x)
    return SpatialAttention(kernel_size, name=f"{name}_spatial")(x)


@dataclass
class ModelConfig:
    """Everything needed to rebuild the architecture; stored in the artifact's manifest."""

    input_size: tuple[int, int] = (150, 200)
    num_classes: int = len(CLASS_NAMES)
    cbam: bool = True
    cbam_stages: tuple[int, ...] = ()
    cbam_ratio: int = 8
    dropout: float = 0.3
    weights: str = "none"
    seed: int | None = 42
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["cbam_stages"] = list(self.cbam_stages)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["input_size"] = tuple(known.get("input_size", (150, 200)))
        known["cbam_stages"] = tuple(known.get("cbam_stages", ()))
        return cls(**known)


def _validate(config: ModelConfig) -> None:
    h, w = config.input_size
    if h < 32 or w < 32:
        raise ValueError(f"Input size must be at least 32x32 for EfficientNetB3, got {h}x{w}.")
    if config.num_classes < 2:
        raise ValueError(f"A classifier needs at least two classes, got {config.num_classes}.")
    unknown = set(config.cbam_stages) - set(BACKBONE_STAGES)
    if unknown:
        raise ValueError(f"CBAM stages must be among {BACKBONE_STAGES}, got {sorted(unknown)}.")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"Dropout must be in [0, 1), got {config.dropout}.")
    if config.cbam_stages and not config.cbam:
        raise ValueError("cbam_stages were given but cbam=False; drop the stages or enable CBAM.")


def _backbone_weights(weights: str) -> str | None:
    """Map the CLI's weights choice to what keras.applications accepts, failing early and clearly."""
    if weights in (None, "", "none"):
        return None
    if weights == "imagenet":
        _require_cached_imagenet_weights()
        return "imagenet"
    if not os.path.isfile(weights):
        raise ValueError(
            f"Backbone weights file {weights!r} does not exist; use 'none', 'imagenet' or a local .h5 path."
        )
    return weights


IMAGENET_WEIGHTS_FILE = "efficientnetb3_notop.h5"


def _require_cached_imagenet_weights() -> None:
    """Fails at once, instead of downloading, when the ImageNet weights are not in Keras' cache.

    Keras would fetch them from storage.googleapis.com; on a machine without network that either
    fails after DNS timeouts or hangs behind a firewall that drops packets. Set
    DERMPORTAL_ALLOW_DOWNLOAD=1 to let Keras download them.
    """
    if os.environ.get("DERMPORTAL_ALLOW_DOWNLOAD") == "1":
        return
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    candidates = [
        os.path.join(keras_home, "models", IMAGENET_WEIGHTS_FILE),
        os.path.join("/tmp/.keras/models", IMAGENET_WEIGHTS_FILE),
    ]
    if not any(os.path.isfile(c) for c in candidates):
        raise ValueError(
            f"ImageNet weights are not cached at {candidates[0]!r} and will not be downloaded (no network at run "
            f"time); copy {IMAGENET_WEIGHTS_FILE} there, pass its path as weights, use 'none', or set "
            "DERMPORTAL_ALLOW_DOWNLOAD=1."
        )


def _stage_end_layers(backbone: keras.Model, stages) -> set[str]:
    """The last layer of each requested backbone stage (e.g. 'block3c_add')."""
    ends = {}
    for layer in backbone.layers:
        for s in stages:
            if layer.name.startswith(f"block{s}"):
                ends[s] = layer.name
    return set(ends.values())


def _insert_stage_cbam(backbone: keras.Model, config: ModelConfig) -> keras.Model:
    """Re-trace the backbone graph with a CBAM block after each requested stage's last layer."""
    ends = _stage_end_layers(backbone, config.cbam_stages)

    def call_with_cbam(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        if layer.name in ends:
            stage = layer.name[len("block") :].split("_")[0][:-1]
            out = cbam_block(out, f"cbam_stage{stage}", config.cbam_ratio)
        return out

    return keras.models.clone_model(backbone, call_function=call_with_cbam)


def build_model(config: ModelConfig | None = None) -> keras.Model:
    """Builds EfficientNetB3 (+ CBAM) with a 7-way softmax head as one flat functional model.

    Args:
        config: architecture settings; defaults to `ModelConfig()`.

    Returns:
        An uncompiled `keras.Model` taking (batch, H, W, 3) float pixels in 0-255.

    Raises:
        ValueError: for impossible sizes, stages or a missing weights file.
    """
    config = config or ModelConfig()
    _validate(config)
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    h, w = config.input_size
    inputs = keras.Input(shape=(h, w, 3), name="image")
    backbone = keras.applications.EfficientNetB3(
        include_top=False, weights=_backbone_weights(config.weights), input_tensor=inputs
    )
    if config.cbam_stages:
        backbone = _insert_stage_cbam(backbone, config)
    x = backbone.output
    if config.cbam:
        x = cbam_block(x, "cbam_top", config.cbam_ratio)
    x = layers.GlobalAveragePooling2D(name=EMBEDDING_LAYER)(x)
    x = layers.Dropout(config.dropout, name="top_dropout")(x)
    outputs = layers.Dense(config.num_classes, activation="softmax", name="predictions", dtype="float32")(x)
    return keras.Model(backbone.inputs, outputs, name="efficientnetb3_cbam" if config.cbam else "efficientnetb3")


def gradcam_layer_name(config: ModelConfig) -> str:
    """The last spatial feature map: CBAM's output when present, else the backbone's top activation."""
    return CBAM_TOP_LAYER if config.cbam else TOP_FEATURE_LAYER


def shift_head_bias(model: keras.Model, shift: ArrayLike) -> None:
    """Adds `shift` (one value per class) to the bias of the softmax head, in place.

    A network trained with logit-adjusted cross-entropy outputs class-balanced posteriors; adding
    tau log prior to its logits gives back posteriors under the training frequencies, which is what
    calibration and the shown probabilities assume. Folded into the bias, every consumer of the
    model (predictor, Grad-CAM, SHAP) sees the same probabilities.

    Raises:
        ValueError: if `shift` does not have one value per class.
    """
    head = model.get_layer("predictions")
    kernel, bias = head.get_weights()
    shift = np.asarray(shift, dtype=np.float32).reshape(-1)
    if shift.shape != bias.shape:
        raise ValueError(f"The head has {bias.shape[0]} classes but the shift has {shift.shape[0]} values.")
    head.set_weights([kernel, bias + shift])
