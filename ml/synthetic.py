"""A tiny synthetic dataset in the HAM10000 layout, for tests, benchmarks and smoke runs.

Each class gets a lesion of its own colour on a skin-coloured background, so that a model can
learn something in one epoch; lesions have one to three images, as in HAM10000.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ml.model import CLASS_NAMES

CLASS_COLOURS = {  # RGB
    "akiec": (200, 60, 60),
    "bcc": (230, 150, 170),
    "bkl": (140, 100, 60),
    "df": (110, 60, 40),
    "mel": (30, 20, 20),
    "nv": (90, 60, 40),
    "vasc": (170, 20, 60),
}


def synthetic_image(dx: str, rng: np.random.Generator, size: tuple[int, int] = (150, 200)) -> np.ndarray:
    """An HxWx3 uint8 RGB image: an ellipse of the class colour on noisy skin."""
    h, w = size
    skin = np.array([220, 180, 160]) + rng.normal(0, 8, 3)
    image = np.clip(skin + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    centre = (int(w / 2 + rng.integers(-w // 8, w // 8 + 1)), int(h / 2 + rng.integers(-h // 8, h // 8 + 1)))
    axes = (int(rng.integers(w // 6, w // 3)), int(rng.integers(h // 6, h // 3)))
    colour = tuple(int(c) for c in np.clip(np.array(CLASS_COLOURS[dx]) + rng.normal(0, 10, 3), 0, 255))
    cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    return image


def make_ham10000_like(
    root: str | os.PathLike,
    lesions_per_class: int | dict = 6,
    size: tuple[int, int] = (150, 200),
    seed: int = 0,
    max_images_per_lesion: int = 3,
) -> Path:
    """Writes `root/HAM10000_metadata.csv` and `root/images/ISIC_*.jpg`.

    Args:
        root: folder to create.
        lesions_per_class: lesions of every class, or a {class: count} dict.
        size: (H, W) of the images; HAM10000's reduced copy is 150x200.
        seed: random seed.
        max_images_per_lesion: each lesion gets 1..this many images.

    Returns:
        The dataset folder.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = lesions_per_class if isinstance(lesions_per_class, dict) else {c: lesions_per_class for c in CLASS_NAMES}
    rows, image_no, lesion_no = [], 24306, 0
    for dx in CLASS_NAMES:
        for _ in range(counts.get(dx, 0)):
            lesion_no += 1
            for _ in range(int(rng.integers(1, max_images_per_lesion + 1))):
                image_id = f"ISIC_{image_no:07d}"
                image_no += 1
                rgb = synthetic_image(dx, rng, size)
                cv2.imwrite(str(root / "images" / f"{image_id}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
                rows.append((f"HAM_{lesion_no:07d}", image_id, dx, "histo", 50.0, "female", "back"))
    columns = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    pd.DataFrame(rows, columns=columns).to_csv(root / "HAM10000_metadata.csv", index=False)
    return root
