"""CBAM layers, the flat model graph, and the builder's errors."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from ml.model import ChannelAttention, ModelConfig, SpatialAttention, build_model, cbam_block, gradcam_layer_name


def test_channel_attention_weights_are_per_channel():
    x = np.random.default_rng(0).normal(size=(2, 5, 6, 16)).astype("float32")
    layer = ChannelAttention(ratio=4)
    out = layer(x)
    weights = keras.ops.convert_to_numpy(layer.attention(x))
    assert weights.shape == (2, 1, 1, 16)
    assert ((weights > 0) & (weights < 1)).all()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), x * weights, rtol=1e-5)


def test_spatial_attention_weights_are_per_position():
    x = np.random.default_rng(1).normal(size=(2, 5, 6, 16)).astype("float32")
    layer = SpatialAttention(kernel_size=3)
    out = layer(x)
    weights = keras.ops.convert_to_numpy(layer.attention(x))
    assert weights.shape == (2, 5, 6, 1)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), x * weights, rtol=1e-5)


def test_cbam_block_keeps_the_shape_and_serialises():
    inputs = keras.Input((8, 8, 12))
    model = keras.Model(inputs, cbam_block(inputs, "cbam_test", ratio=3, kernel_size=5))
    assert model.output_shape == (None, 8, 8, 12)
    config = model.get_layer("cbam_test_channel").get_config()
    assert ChannelAttention.from_config(config).ratio == 3
    assert SpatialAttention.from_config(model.get_layer("cbam_test_spatial").get_config()).kernel_size == 5


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: ChannelAttention(ratio=0), "ratio must be at least 1"),
        (lambda: SpatialAttention(kernel_size=4), "kernel_size must be odd and positive"),
    ],
)
def test_cbam_layers_reject_bad_settings(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(ModelConfig(input_size=(32, 32), cbam_stages=(6,)))


def test_model_is_one_flat_graph(tiny_model):
    nested = [layer.name for layer in tiny_model.layers if isinstance(layer, keras.Model)]
    assert nested == []
    assert tiny_model.get_layer("cbam_stage6_spatial") is not None
    assert tiny_model.get_layer(gradcam_layer_name(ModelConfig())) is not None
    assert tiny_model.output_shape == (None, 7)


def test_model_outputs_probabilities(tiny_model):
    probs = keras.ops.convert_to_numpy(tiny_model(np.zeros((2, 32, 32, 3), "float32")))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "config, match",
    [
        (ModelConfig(input_size=(16, 64)), "Input size must be at least 32x32"),
        (ModelConfig(num_classes=1), "at least two classes"),
        (ModelConfig(cbam_stages=(9,)), "CBAM stages must be among"),
        (ModelConfig(dropout=1.0), r"Dropout must be in \[0, 1\)"),
        (ModelConfig(cbam=False, cbam_stages=(3,)), "cbam_stages were given but cbam=False"),
        (ModelConfig(weights="/nonexistent/weights.h5"), "does not exist"),
    ],
)
def test_builder_rejects_bad_configs_before_building(config, match):
    with pytest.raises(ValueError, match=match):
        build_model(config)


def test_imagenet_weights_without_cache_fail_fast_instead_of_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DERMPORTAL_ALLOW_DOWNLOAD", raising=False)
    if (tmp_path.parent / ".keras").exists():
        pytest.skip("unexpected keras cache")
    import os

    if os.path.isfile("/tmp/.keras/models/efficientnetb3_notop.h5"):
        pytest.skip("ImageNet weights are cached in /tmp/.keras on this machine")
    with pytest.raises(ValueError, match="ImageNet weights are not cached"):
        build_model(ModelConfig(input_size=(32, 32), weights="imagenet"))


def test_config_roundtrips_through_a_dict():
    config = ModelConfig(input_size=(48, 64), cbam_stages=(3, 5), dropout=0.2)
    again = ModelConfig.from_dict(config.to_dict() | {"backbone": "EfficientNetB3"})
    assert again == config
