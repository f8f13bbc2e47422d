"""Images that are not dermoscopy, generated offline: the recipe of the out-of-distribution set.

The portal must say when an upload is not a dermoscopic image (ml.ood). To measure that, and to
give the detector examples of what "not dermoscopy" looks like (outlier exposure), this module
draws such images from a seed, with no download: photograph-like scenes, documents and
screenshots, charts, X-ray-like images, noise, flat colours, clip art (geometric shapes), smooth
gradients, blurred and tinted scenes, lesion masks, and skin without a lesion (lesion-free corners
of HAM10000 images, found with their segmentation masks).

Kinds are split in two so that the detector is never measured on a kind it was trained on:
TRAINING_KINDS feed the outlier exposure, EVALUATION_KINDS only the measurement
(`python -m ml.ood --evaluate`). `scripts/make_ood_set.py` writes any kind to PNG files.
"""

from __future__ import annotations

import io
import string
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

SIZE = (150, 200)  # (H, W): HAM10000's 4:3 frame, as the portal receives it

Generator = Callable[[np.random.Generator], np.ndarray]


def _blank(rng: np.random.Generator, colour) -> np.ndarray:
    return np.full((*SIZE, 3), colour, dtype=np.uint8)


def noise(rng: np.random.Generator) -> np.ndarray:
    """Uniform, Gaussian or smoothed random noise."""
    h, w = SIZE
    style = rng.integers(3)
    if style == 0:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if style == 1:
        return np.clip(rng.normal(128, rng.uniform(20, 80), (h, w, 3)), 0, 255).astype(np.uint8)
    small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def flat(rng: np.random.Generator) -> np.ndarray:
    """One colour (a third of them skin tones), or a two-colour gradient."""
    if rng.random() < 0.33:
        colour = np.clip(np.array([225, 180, 155]) + rng.normal(0, 20, 3), 0, 255)
    else:
        colour = rng.integers(0, 256, 3)
    image = _blank(rng, colour).astype(np.float32)
    if rng.random() < 0.5:
        other = rng.integers(0, 256, 3).astype(np.float32)
        ramp = np.linspace(0, 1, SIZE[1], dtype=np.float32)[None, :, None]
        image = image * (1 - ramp) + other * ramp
    return image.astype(np.uint8)


def photo(rng: np.random.Generator) -> np.ndarray:
    """A photograph-like street scene: sky, ground, buildings with windows, a sun or trees."""
    h, w = SIZE
    top, bottom = rng.integers(120, 255, 3), rng.integers(60, 200, 3)
    ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    image = (top * (1 - ramp) + bottom * ramp).repeat(w, axis=1).astype(np.uint8)
    horizon = int(rng.integers(h // 2, h - 10))
    image[horizon:] = np.clip(rng.integers(40, 140, 3) + rng.normal(0, 10, (h - horizon, w, 3)), 0, 255)
    for _ in range(rng.integers(2, 7)):
        x0, bw = int(rng.integers(0, w - 20)), int(rng.integers(15, 60))
        y0 = int(rng.integers(10, horizon - 5))
        cv2.rectangle(image, (x0, y0), (x0 + bw, horizon), tuple(int(c) for c in rng.integers(50, 230, 3)), -1)
        for wy in range(y0 + 4, horizon - 6, 10):
            for wx in range(x0 + 3, x0 + bw - 5, 8):
                cv2.rectangle(image, (wx, wy), (wx + 4, wy + 5), tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
    for _ in range(rng.integers(0, 4)):
        centre = (int(rng.integers(0, w)), int(rng.integers(horizon - 20, h)))
        cv2.circle(image, centre, int(rng.integers(6, 18)), (int(rng.integers(20, 80)), 120, 40), -1)
    image = cv2.GaussianBlur(image, (3, 3), 0)
    return np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)


def _text_line(rng: np.random.Generator, length: int) -> str:
    letters = string.ascii_letters + "      0123456789.,"
    return "".join(rng.choice(list(letters), length))


def document(rng: np.random.Generator) -> np.ndarray:
    """A text page or an application screenshot (title bar, menu, text, buttons)."""
    h, w = SIZE
    screenshot = rng.random() < 0.5
    image = _blank(rng, rng.integers(225, 256, 3) if not screenshot else rng.integers(200, 256, 3))
    y = 12
    if screenshot:
        cv2.rectangle(image, (0, 0), (w, 14), tuple(int(c) for c in rng.integers(0, 200, 3)), -1)
        y = 26
    scale = float(rng.uniform(0.25, 0.4))
    while y < h - 4:
        colour = (0, 0, 0) if rng.random() < 0.8 else tuple(int(c) for c in rng.integers(0, 150, 3))
        cv2.putText(image, _text_line(rng, 40), (4, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
        y += int(rng.integers(9, 14))
        if screenshot and rng.random() < 0.15:
            x0 = int(rng.integers(4, w - 50))
            cv2.rectangle(image, (x0, y - 8), (x0 + 40, y + 4), tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
            y += 8
    return image


def chart(rng: np.random.Generator) -> np.ndarray:
    """A matplotlib bar, line, scatter or pie chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.0, 1.5), dpi=100)
    kind, n = int(rng.integers(4)), int(rng.integers(3, 12))
    values = rng.uniform(1, 10, n)
    if kind == 0:
        ax.bar(range(n), values, color=rng.uniform(0, 1, (n, 3)))
    elif kind == 1:
        for _ in range(rng.integers(1, 4)):
            ax.plot(np.cumsum(rng.normal(0, 1, 30)))
    elif kind == 2:
        ax.scatter(rng.normal(0, 1, 60), rng.normal(0, 1, 60), s=6, c=rng.uniform(0, 1, 60))
    else:
        ax.pie(values[:6])
    ax.set_title(_text_line(rng, 12), fontsize=6)
    ax.tick_params(labelsize=5)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    png = cv2.imdecode(np.frombuffer(buffer.getvalue(), np.uint8), cv2.IMREAD_COLOR)
    return cv2.resize(cv2.cvtColor(png, cv2.COLOR_BGR2RGB), (SIZE[1], SIZE[0]), interpolation=cv2.INTER_AREA)


def xray(rng: np.random.Generator) -> np.ndarray:
    """A grayscale radiograph- or CT-like image: bright bones or a round slice on a dark field."""
    h, w = SIZE
    image = np.zeros((h, w), np.float32)
    if rng.random() < 0.5:
        cv2.ellipse(image, (w // 2, h // 2), (w // 3, h // 2 - 5), 0, 0, 360, 0.35, -1)  # a thorax
        for k in range(int(rng.integers(5, 9))):
            y = 20 + k * 14
            for side in (-1, 1):
                cv2.ellipse(
                    image,
                    (w // 2 + side * 10, y),
                    (w // 4, 8),
                    0,
                    0 if side > 0 else 180,
                    180 if side > 0 else 360,
                    0.8,
                    3,
                )
        cv2.line(image, (w // 2, 0), (w // 2, h), 0.9, 6)  # the spine
    else:
        cv2.circle(image, (w // 2, h // 2), int(h * 0.45), 0.45, -1)  # a CT slice
        cv2.circle(image, (w // 2, h // 2), int(h * 0.45), 0.95, 3)
        for _ in range(int(rng.integers(2, 6))):
            centre = (int(w / 2 + rng.normal(0, 20)), int(h / 2 + rng.normal(0, 15)))
            cv2.ellipse(
                image,
                centre,
                (int(rng.integers(5, 20)), int(rng.integers(5, 20))),
                0,
                0,
                360,
                float(rng.uniform(0.1, 0.9)),
                -1,
            )
    image = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(1, 3))) + rng.normal(0, 0.04, (h, w))
    grey = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def shapes(rng: np.random.Generator) -> np.ndarray:
    """Clip art or a diagram: filled circles, rectangles, triangles and lines on a plain or
    gradient background."""
    h, w = SIZE
    background = rng.integers(0, 256, 3).astype(np.float32)
    ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None, None] * (rng.random() < 0.5)
    image = np.repeat(background * (1 - ramp) + rng.integers(0, 256, 3) * ramp, w, axis=1).astype(np.uint8)
    image = np.ascontiguousarray(image)
    for _ in range(int(rng.integers(3, 10))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        size = int(rng.integers(6, 45))
        form = rng.integers(4)
        if form == 0:
            cv2.circle(image, (x, y), size, colour, -1, cv2.LINE_AA)
        elif form == 1:
            cv2.rectangle(image, (x, y), (x + size, y + int(rng.integers(6, 45))), colour, -1)
        elif form == 2:
            points = np.array([[x, y], [x + size, y], [x + size // 2, y - size]], np.int32)
            cv2.fillPoly(image, [points], colour, cv2.LINE_AA)
        else:
            end = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(image, (x, y), end, colour, int(rng.integers(1, 5)), cv2.LINE_AA)
    return image


def gradient(rng: np.random.Generator) -> np.ndarray:
    """A smooth linear or radial blend of two or three colours (a third of them skin tones and
    browns): no texture at all, though a radial one has a dark centre like a lesion."""
    h, w = SIZE
    skin = rng.random() < 0.33
    colours = [np.clip(np.array([225, 180, 155]) + rng.normal(0, 20, 3), 0, 255) if skin else rng.integers(0, 256, 3)]
    colours.append(np.array([110, 70, 50]) + rng.normal(0, 15, 3) if skin else rng.integers(0, 256, 3))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if rng.random() < 0.5:
        angle = rng.uniform(0, np.pi)
        t = xx * np.cos(angle) + yy * np.sin(angle)
    else:
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        t = -np.hypot(yy - cy, xx - cx)  # the second colour at the centre
    t = ((t - t.min()) / (np.ptp(t) + 1e-6))[:, :, None]
    image = colours[0] * (1 - t) + colours[1] * t
    if rng.random() < 0.5:
        image = image * 0.6 + rng.integers(0, 256, 3) * 0.4 * (xx / w)[:, :, None]
    return np.clip(image, 0, 255).astype(np.uint8)


def blurred(rng: np.random.Generator) -> np.ndarray:
    """A photograph-like scene or an X-ray, heavily blurred and tinted (hue turned, colours scaled):
    colour and texture unlike both the originals and dermoscopy."""
    image = (photo if rng.random() < 0.6 else xray)(rng)
    image = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(3, 8)))
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(0, 180))) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 2.5) + rng.integers(0, 80), 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


GENERATED: dict[str, Generator] = {
    "noise": noise,
    "flat": flat,
    "photo": photo,
    "document": document,
    "chart": chart,
    "xray": xray,
    "shapes": shapes,
    "gradient": gradient,
    "blurred": blurred,
}
# Each generated kind's random stream is its place here: a new kind goes at the end, so that the
# images of the kinds before it (and every measurement made on them) never change.
STREAMS = ("chart", "document", "flat", "noise", "photo", "xray", "shapes", "gradient", "blurred")
FROM_HAM10000 = ("mask", "skin")  # drawn from the dataset's images and masks (`ham_outliers`)
TRAINING_KINDS = ("noise", "flat", "document", "mask")
EVALUATION_KINDS = (
    *("photo", "chart", "xray", "skin", "noise", "flat", "document", "mask"),
    *("shapes", "gradient", "blurred"),  # never trained on, like the first four
)


def generate(kind: str, n: int, seed: int) -> np.ndarray:
    """`n` images of a generated kind as an (n, H, W, 3) uint8 array, the same for the same seed.

    Raises:
        ValueError: for a kind that is not generated (see GENERATED; masks and skin come from
            `ham_outliers`).
    """
    if kind not in GENERATED:
        raise ValueError(f"Unknown generated kind {kind!r}; expected one of {sorted(GENERATED)}.")
    rng = np.random.default_rng([seed, STREAMS.index(kind)])
    return np.stack([GENERATED[kind](rng) for _ in range(n)]) if n else np.zeros((0, *SIZE, 3), np.uint8)


def mask_path(image_path: str | Path) -> Path:
    """The segmentation mask that HAM10000's `images/ISIC_x.jpg` has in `masks/ISIC_x_segmentation.png`."""
    image_path = Path(image_path)
    return image_path.parent.parent / "masks" / f"{image_path.stem}_segmentation.png"


def lesion_free_crop(image: np.ndarray, mask: np.ndarray, fraction: float = 0.4) -> np.ndarray | None:
    """The brightest corner window (fraction of each side) that holds no lesion pixel, resized to
    SIZE; None when every corner touches the lesion. Brightest: the dark vignette of the
    dermoscope's round field is not skin."""
    h, w = mask.shape[:2]
    ch, cw = int(h * fraction), int(w * fraction)
    best, best_mean = None, -1.0
    for y0 in (0, (h - ch) // 2, h - ch):
        for x0 in (0, (w - cw) // 2, w - cw):
            if mask[y0 : y0 + ch, x0 : x0 + cw].any():
                continue
            window = image[y0 : y0 + ch, x0 : x0 + cw]
            if window.mean() > best_mean:
                best, best_mean = window, float(window.mean())
    if best is None:
        return None
    return cv2.resize(best, (SIZE[1], SIZE[0]), interpolation=cv2.INTER_LINEAR)


def ham_outliers(image_paths: Sequence[str | Path], kind: str, n: int, seed: int) -> np.ndarray:
    """Up to `n` images of kind "mask" (the lesion masks, as RGB) or "skin" (lesion-free crops) from
    the given HAM10000 images (pass one split's images only, so that training and evaluation never
    share a source image)."""
    if kind not in FROM_HAM10000:
        raise ValueError(f"Unknown dataset kind {kind!r}; expected one of {FROM_HAM10000}.")
    rng = np.random.default_rng(seed)
    out = []
    for index in rng.permutation(len(image_paths)):
        mask = cv2.imread(str(mask_path(image_paths[index])), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            continue
        if kind == "mask":
            out.append(cv2.resize(np.repeat(mask[:, :, None], 3, axis=2), (SIZE[1], SIZE[0])))
        else:
            image = cv2.cvtColor(cv2.imread(str(image_paths[index])), cv2.COLOR_BGR2RGB)
            crop = lesion_free_crop(image, cv2.resize(mask, (image.shape[1], image.shape[0])) > 127)
            if crop is not None:
                out.append(crop)
        if len(out) == n:
            break
    return np.stack(out) if out else np.zeros((0, *SIZE, 3), np.uint8)
