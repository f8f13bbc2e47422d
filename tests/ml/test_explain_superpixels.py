"""Superpixels follow the image's edges, each is one connected piece, and their hierarchy's top
split separates a lesion-like disc from its background; the region masker hides by region."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.cluster.hierarchy import is_valid_linkage

from ml.explain.shap_explainer import blurred, region_masker
from ml.explain.superpixels import region_adjacency, region_tree, superpixels

H, W = 60, 80


def disc_image(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A dark-brown disc off the centre on pink skin, with noise: (image, disc mask)."""
    yy, xx = np.mgrid[0:H, 0:W]
    disc = (yy - 27) ** 2 + (xx - 45) ** 2 < 17**2
    image = np.where(disc[..., None], (90, 50, 40), (220, 160, 150)).astype(np.float32)
    image += np.random.default_rng(seed).normal(0, 6, image.shape)
    return np.clip(image, 0, 255), disc


def test_regions_follow_the_disc_edge_and_are_connected():
    image, disc = disc_image()
    labels = superpixels(image, n_segments=48)
    k = labels.max() + 1
    assert labels.shape == (H, W) and labels.dtype == np.int32
    assert 30 <= k <= 70 and set(np.unique(labels)) == set(range(k))
    inside = np.array([disc[labels == i].mean() for i in range(k)])
    purity = np.maximum(inside, 1 - inside)
    assert purity.min() > 0.9 and purity.mean() > 0.97  # a grid of squares would cut the edge
    for i in range(k):
        assert ndimage.label(labels == i)[1] == 1


def test_the_tree_is_a_linkage_whose_top_split_is_disc_against_skin():
    image, disc = disc_image()
    labels = superpixels(image, n_segments=48)
    tree = region_tree(image, labels)
    k = labels.max() + 1
    assert tree.shape == (k - 1, 4) and is_valid_linkage(tree) and (tree[:, 2] > 0).all()
    members = {i: {i} for i in range(k)}
    for i, (left, right, _, size) in enumerate(tree):
        members[k + i] = members[int(left)] | members[int(right)]
        assert len(members[k + i]) == size
    left, right = (members[int(c)] for c in tree[-1, :2])
    disc_side = np.isin(labels, list(left if disc[np.isin(labels, list(left))].mean() > 0.5 else right))
    assert (disc_side == disc).mean() > 0.95


def test_every_merge_joins_regions_that_touch():
    image, _ = disc_image(1)
    labels = superpixels(image, n_segments=48)
    tree, adjacency = region_tree(image, labels), region_adjacency(labels).toarray() > 0
    k = labels.max() + 1
    members = {i: [i] for i in range(k)}
    for i, (left, right, _, _) in enumerate(tree):
        a, b = members[int(left)], members[int(right)]
        assert adjacency[np.ix_(a, b)].any()
        members[k + i] = a + b


def test_the_region_masker_keeps_marked_regions_and_blurs_the_rest():
    image, _ = disc_image()
    masker = region_masker(image, "blur(9,9)", n_segments=24)
    k = masker.shape[1]
    labels = superpixels(image, 24)
    mask = np.zeros(k, bool)
    mask[::2] = True
    (out,) = masker(mask, masker.row[0])
    kept = mask[labels]
    assert out.shape == (1, H, W, 3)
    np.testing.assert_array_equal(out[0][kept], image.astype(np.float32)[kept])
    np.testing.assert_allclose(out[0][~kept], blurred(image, "blur(9,9)")[~kept])
    spread = masker.to_pixels(np.arange(k, dtype=np.float32)[:, None])
    assert spread.shape == (1, H, W)
    np.testing.assert_allclose(spread.sum(), np.arange(k).sum(), rtol=1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: superpixels(np.zeros((8, 8))), "HxWx3 RGB image"),
        (lambda: superpixels(np.zeros((8, 8, 3)), n_segments=1), "n_segments must be at least 2"),
        (lambda: region_tree(np.zeros((8, 8, 3)), np.zeros((8, 8), np.int32)), "at least two regions"),
        (lambda: blurred(np.zeros((8, 8, 3)), "gauss(3)"), r"must read 'blur\(kx,ky\)'"),
    ],
)
def test_bad_input_raises_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
