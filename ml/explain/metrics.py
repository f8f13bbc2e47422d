"""Where an explanation puts its mass: shares of a map inside a region or a lesion mask.

Used by the faithfulness tests (known signal region) and by `scripts/gradcam_lesion_overlap.py`
(HAM10000 lesion segmentations). A share is compared with the region's share of the image: a map
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
