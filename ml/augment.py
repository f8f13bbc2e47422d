"""Training batches and their augmentation in NumPy/OpenCV, so that training runs on any Keras backend.

Dermoscopy has no canonical orientation, scale or white balance: every training image is a random
resized crop (sometimes of a tall region turned by 90 degrees), flipped, colour-jittered, and some
batches are mixed pairwise (mixup). The images are kept in memory as uint8 at a source size a little
larger than the training size, so that crops are shrunk, never blown up.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import keras
import numpy as np

from ml.model import CLASS_NAMES

# Crops are drawn from images this much larger than the training input (HAM10000's 150x200 for 120x160).
SOURCE_SCALE = 1.25
# ITU-R BT.601 luma weights, for the grey image that saturation jitter blends towards.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class AugmentRecipe:
    """Ranges of the random training augmentation; all zero/False is the identity (plus the resize)."""

    crop_scale: tuple[float, float] = (0.45, 1.0)  # fraction of the source area a crop covers
    aspect_jitter: float = 0.15  # the crop's log aspect ratio varies by up to this
    rot90_probability: float = 0.3  # tall crop turned by 90 degrees to the training aspect
    flip: bool = True  # horizontal and vertical, each with probability 1/2
    brightness: float = 0.2  # pixel values times 1 +- this
    contrast: float = 0.2  # distance from the image mean times 1 +- this
    saturation: float = 0.2  # distance from the grey image times 1 +- this
    mixup_alpha: float = 0.2  # Beta(alpha, alpha) mixing weight; 0 turns mixup off
    mixup_probability: float = 0.5  # share of batches that are mixed

    def describe(self) -> dict:
        return asdict(self)


NO_AUGMENTATION = AugmentRecipe((1.0, 1.0), 0.0, 0.0, False, 0.0, 0.0, 0.0, 0.0, 0.0)
# By name for `ml.train --augment`; "mild" is close to the Keras-layer augmentation of the first run.
RECIPES = {
    "strong": AugmentRecipe(),
    "mild": AugmentRecipe(
        crop_scale=(0.8, 1.0),
        aspect_jitter=0.05,
        rot90_probability=0.0,
        brightness=0.1,
        contrast=0.1,
        saturation=0.0,
        mixup_alpha=0.0,
    ),
}


def source_size(input_size: tuple[int, int]) -> tuple[int, int]:
    """The (H, W) at which training images are cached, so that crops are shrunk to the input size."""
    return round(input_size[0] * SOURCE_SCALE), round(input_size[1] * SOURCE_SCALE)


def random_resized_crop(
    image: np.ndarray, out_size: tuple[int, int], rng: np.random.Generator, recipe: AugmentRecipe
) -> np.ndarray:
    """One random crop of `image` with the output's aspect ratio (up to jitter), resized to `out_size`."""
    src_h, src_w = image.shape[:2]
    out_h, out_w = out_size
    turn = rng.random() < recipe.rot90_probability
    # A turned crop must be tall (out_w x out_h) so that it has the output's aspect after the turn.
    aspect = (out_h / out_w if turn else out_w / out_h) * math.exp(rng.uniform(-1, 1) * recipe.aspect_jitter)
    area = rng.uniform(*recipe.crop_scale) * src_h * src_w
    crop_w = min(src_w, max(8, round(math.sqrt(area * aspect))))
    crop_h = min(src_h, max(8, round(math.sqrt(area / aspect))))
    top = int(rng.integers(0, src_h - crop_h + 1))
    left = int(rng.integers(0, src_w - crop_w + 1))
    crop = image[top : top + crop_h, left : left + crop_w]
    if turn:
        crop = np.rot90(crop, k=int(rng.choice((1, 3))))
    return cv2.resize(np.ascontiguousarray(crop), (out_w, out_h), interpolation=cv2.INTER_AREA)


def colour_jitter(batch: np.ndarray, rng: np.random.Generator, recipe: AugmentRecipe) -> np.ndarray:
    """Per-image random brightness, contrast and saturation on a float32 (N, H, W, 3) 0-255 batch."""
    n = len(batch)

    def factors(strength: float) -> np.ndarray:
        return (1.0 + rng.uniform(-strength, strength, size=(n, 1, 1, 1))).astype(np.float32)

    out = batch * factors(recipe.brightness)
    mean = out.mean(axis=(1, 2, 3), keepdims=True)
    out = mean + (out - mean) * factors(recipe.contrast)
    grey = (out @ LUMA)[..., None]
    out = grey + (out - grey) * factors(recipe.saturation)
    return np.clip(out, 0.0, 255.0)


def augment_batch(
    images: np.ndarray, out_size: tuple[int, int], rng: np.random.Generator, recipe: AugmentRecipe
) -> np.ndarray:
    """Crops, flips and colour-jitters a uint8 batch into float32 0-255 at `out_size`."""
    out = np.empty((len(images), *out_size, 3), dtype=np.float32)
    for i, image in enumerate(images):
        crop = random_resized_crop(image, out_size, rng, recipe)
        if recipe.flip and rng.random() < 0.5:
            crop = crop[:, ::-1]
        if recipe.flip and rng.random() < 0.5:
            crop = crop[::-1]
        out[i] = crop
    return colour_jitter(out, rng, recipe)


def mixup(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator, recipe: AugmentRecipe
) -> tuple[np.ndarray, np.ndarray]:
    """Mixes a batch with a shuffled copy of itself (Zhang et al., 2018) in a share of the batches."""
    if recipe.mixup_alpha <= 0 or rng.random() >= recipe.mixup_probability:
        return x, y
    lam = float(rng.beta(recipe.mixup_alpha, recipe.mixup_alpha))
    lam = max(lam, 1.0 - lam)  # the first image stays the dominant one
    order = rng.permutation(len(x))
    return lam * x + (1 - lam) * x[order], lam * y + (1 - lam) * y[order]


class ImageBatches(keras.utils.PyDataset):
    """Batches of (float32 images 0-255, float32 one-hot labels) from in-memory uint8 images.

    Training batches are shuffled (or class-balanced when `balance="sampling"`), augmented and
    mixed; evaluation batches keep the order and are only resized. Works with every Keras backend.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        out_size: tuple[int, int],
        training: bool = False,
        recipe: AugmentRecipe = NO_AUGMENTATION,
        balance: str = "none",
        seed: int = 42,
        num_classes: int = len(CLASS_NAMES),
    ):
        super().__init__()
        if len(images) != len(labels):
            raise ValueError(f"Got {len(images)} images but {len(labels)} labels.")
        if batch_size < 1:
            raise ValueError(f"Batch size must be positive, got {batch_size}.")
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.onehot = np.eye(num_classes, dtype=np.float32)[self.labels]
        self.batch_size, self.out_size = batch_size, tuple(out_size)
        self.training, self.recipe, self.balance = training, recipe, balance
        self.seed, self.epoch = seed, 0
        self.order = self._epoch_order()

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        images, labels = self.images[rows], self.onehot[rows]
        if not self.training:
            return self._resized(images), labels
        rng = np.random.default_rng((self.seed, self.epoch, index))
        x = augment_batch(images, self.out_size, rng, self.recipe)
        return mixup(x, labels, rng, self.recipe)

    def on_epoch_end(self) -> None:
        self.start_at(self.epoch + 1)

    def start_at(self, epoch: int) -> None:
        """The batches from now on are those of `epoch` (0-based, Keras' epoch index). A resumed run
        calls it with the epoch it resumes at, and draws the order and augmentations an uninterrupted
        run draws there: a new dataset would otherwise replay epoch 0's at every resume, and a run
        resumed many times would see the same augmented images again and again."""
        self.epoch = epoch
        self.order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        n = len(self.images)
        if not self.training:
            return np.arange(n)
        rng = np.random.default_rng((self.seed, self.epoch))
        if self.balance != "sampling":
            return rng.permutation(n)
        classes = np.unique(self.labels)
        drawn = rng.choice(classes, size=n)  # every class equally often, then an image of it
        return np.array([rng.choice(np.flatnonzero(self.labels == c)) for c in drawn])

    def _resized(self, images: np.ndarray) -> np.ndarray:
        if images.shape[1:3] == self.out_size:
            return images.astype(np.float32)
        h, w = self.out_size
        return np.stack([cv2.resize(i, (w, h), interpolation=cv2.INTER_AREA) for i in images]).astype(np.float32)
