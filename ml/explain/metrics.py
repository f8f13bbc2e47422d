"""Where an explanation puts its mass: shares of a map inside a region or a lesion mask.

Used by the faithfulness tests (known signal region), `scripts/gradcam_lesion_overlap.py` and
`scripts/explain_faithfulness.py` (HAM10000 lesion segmentations). `attribution_order` is the
one ranking of a map's pixels that both `top_share_inside` and the deletion curve
(`ml.explain.faithfulness`) use. A share is compared with the region's share of the image: a map
that ignored the region would score about the region's area.
"""

from __future__ import annotations

import numpy as np

from ml.explain.gradcam import resize_map


def _region_mask(values: np.ndarray, region: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    region = np.asarray(region)
    if values.ndim != 2:
        raise ValueError(f"The map must be 2-D, got shape {values.shape}.")
    if region.ndim != 2:
        raise ValueError(f"The region mask must be 2-D, got shape {region.shape}.")
    if region.shape != values.shape:
        region = resize_map(region.astype(np.float32), values.shape) >= 0.5
    return region.astype(bool)


def energy_inside(values: np.ndarray, region: np.ndarray) -> float | None:
    """Share of a non-negative map's sum that lies inside `region`.

    Args:
        values: 2-D non-negative map (e.g. Grad-CAM in [0, 1]).
        region: 2-D boolean (or 0/1, 0/255) mask; resized to the map when sizes differ.

    Returns:
        A float in [0, 1], or None for an all-zero map (the share is undefined).

    Raises:
        ValueError: for non-2-D inputs or negative map values.
    """
    mask = _region_mask(values, np.asarray(region) > 0)
    values = np.asarray(values, dtype=np.float64)
    if values.min(initial=0.0) < 0:
        raise ValueError("energy_inside needs a non-negative map; use positive_mass_inside for signed values.")
    total = values.sum()
    return float(values[mask].sum() / total) if total > 0 else None


def positive_mass_inside(values: np.ndarray, region: np.ndarray) -> float | None:
    """Share of a signed map's positive part (e.g. SHAP evidence for a class) inside `region`.

    Returns:
        A float in [0, 1], or None when the map has no positive value.
    """
    return energy_inside(np.clip(np.asarray(values, dtype=np.float64), 0.0, None), region)


def peak_inside(values: np.ndarray, region: np.ndarray) -> bool:
    """Whether the map's maximum falls inside `region` (the 'pointing game')."""
    mask = _region_mask(values, np.asarray(region) > 0)
    return bool(mask.flat[int(np.argmax(values))])


def attribution_order(values: np.ndarray, seed: int = 0) -> np.ndarray:
    """Flat pixel indices from the most to the least attributed.

    Ties (a map of flat regions, or all zero) are broken by a seeded random permutation, so that a
    map that cannot tell pixels apart gains nothing from the pixels' scan order.

    Raises:
        ValueError: for a map that is not 2-D or holds NaN.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"The map must be 2-D, got shape {values.shape}.")
    if np.isnan(values).any():
        raise ValueError("The map holds NaN values.")
    tie_break = np.random.default_rng(seed).permutation(values.size)
    return np.lexsort((tie_break, -values.ravel()))


def top_share_inside(values: np.ndarray, region: np.ndarray, fraction: float | None = None, seed: int = 0) -> float:
    """Share of the map's top-attributed pixels that lie inside `region`.

    Args:
        values: 2-D map (signed or not; the highest values count as most attributed).
        region: 2-D boolean (or 0/1, 0/255) mask; resized to the map when sizes differ.
        fraction: how much of the image counts as "top"; None takes as many pixels as the region
            has, so a map that marks exactly the region scores 1 and a map blind to it scores about
            the region's share of the image.
        seed: tie-break seed (`attribution_order`).

    Raises:
        ValueError: for an empty region, a fraction outside (0, 1] or a bad map.
    """
    mask = _region_mask(values, np.asarray(region) > 0).ravel()
    if fraction is None:
        if not mask.any():
            raise ValueError("The region is empty: no top share to measure.")
        count = int(mask.sum())
    elif 0 < fraction <= 1:
        count = max(int(round(fraction * mask.size)), 1)
    else:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    return float(mask[attribution_order(values, seed)[:count]].mean())
