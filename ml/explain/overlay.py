"""Drawing explanation maps over images: colour maps, blending, colour bars and PNG bytes.

Kept apart from the explainers (the tf-keras-vis habit): explainers return float arrays, these
functions turn arrays into uint8 RGB pictures. Only matplotlib's colormap registry and its Agg
canvas are used (never pyplot), so drawing is safe in worker processes without a display.

- Grad-CAM maps are in [0, 1] and drawn with a perceptually uniform sequential colour map
  (GRADCAM_CMAP, inferno): equal steps of the map look like equal steps of brightness, where jet's
  bright yellow and cyan bands invent edges the map does not have.
- SHAP values are signed and drawn with a diverging map (SHAP_CMAP: red raises the class score, blue
  lowers it) on a symmetric scale [-vmax, vmax] with vmax = max |value| unless given.
- In both, the colour layer's opacity follows the map's strength (`ramp_alpha`): where the map is
  weak the lesion shows through instead of being washed over by the map's low colour.
"""

from __future__ import annotations

import functools

import cv2
import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

GRADCAM_CMAP = "inferno"
SHAP_CMAP = "coolwarm"  # Moreland's diverging map: -v and +v equally light, the lightest at 0
HEATMAP_CMAPS = ("inferno", "viridis", "magma", "turbo", "jet")


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"The image must be an HxWx3 RGB array, got shape {image.shape}.")
    if image.dtype != np.uint8:
        raise ValueError(f"The image must be uint8 RGB (0-255), got dtype {image.dtype}.")
    return image


def _check_map(values: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"An explanation map must be a 2-D array, got shape {values.shape}.")
    if not np.all(np.isfinite(values)):
        raise ValueError("The explanation map contains NaN or infinite values.")
    if image is not None and values.shape != image.shape[:2]:
        values = cv2.resize(values, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    return values


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Opacity alpha must be between 0 and 1, got {alpha}.")


def _colormap(name: str):
    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"Unknown colour map {name!r}; try one of {HEATMAP_CMAPS} or {SHAP_CMAP!r}.") from None


def colorize(values: np.ndarray, cmap: str = GRADCAM_CMAP, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """Map a 2-D array to colours.

    Args:
        values: (H, W) float array.
        cmap: matplotlib colour map name.
        vmin: value drawn with the colour map's first colour.
        vmax: value drawn with its last colour.

    Returns:
        (H, W, 3) uint8 RGB.

    Raises:
        ValueError: for a non-2-D map, non-finite values, an empty range or an unknown colour map.
    """
    indices, palette = colour_indices(values, cmap, vmin, vmax)
    return palette[indices]


def colour_indices(
    values: np.ndarray, cmap: str = GRADCAM_CMAP, vmin: float = 0.0, vmax: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """`colorize` as indices into the colour map's table: ((H, W) uint8 indices, (N, 3) uint8 RGB
    table), N <= 256. A palette PNG of these is pixel for pixel `colorize`'s image, and cheaper to
    write. Raises what `colorize` raises."""
    values = _check_map(values)
    if not vmax > vmin:
        raise ValueError(f"The colour scale needs vmax > vmin, got vmin={vmin} and vmax={vmax}.")
    palette = _palette(cmap)
    scaled = np.clip((values - vmin) / (vmax - vmin), 0.0, 1.0)
    # Index the lookup table by rounding, so that +v and -v land on mirrored entries of a
    # diverging map (matplotlib's own float lookup floors, shifting positives by one entry).
    indices = np.rint(scaled * (len(palette) - 1)).astype(np.uint8)
    return indices, palette.copy()


@functools.cache
def _palette(cmap: str) -> np.ndarray:
    """The colour map's (N, 3) uint8 RGB table, built once per name: matplotlib hands out a copy of
    the map that builds its table again on each lookup (a third of a worker's colour-layer time)."""
    colormap = _colormap(cmap)
    if colormap.N > 256:
        raise ValueError(f"The colour map {cmap!r} has {colormap.N} entries; at most 256 are supported.")
    return np.ascontiguousarray(colormap(np.arange(colormap.N), bytes=True)[:, :3])


def ramp_alpha(entries: int = 256) -> np.ndarray:
    """Opacity (uint8) of each entry of a sequential colour table: proportional to the value it
    stands for, 0 at the scale's low end and 255 at its top. The worker writes it as the palette
    PNG's transparency, so the colour layer's strength follows the map."""
    if entries < 2:
        raise ValueError(f"A colour table needs at least 2 entries, got {entries}.")
    return np.rint(np.linspace(0.0, 255.0, entries)).astype(np.uint8)


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.8, cmap: str = GRADCAM_CMAP) -> np.ndarray:
    """Blend a [0, 1] heatmap (e.g. Grad-CAM) over an image, the colour's opacity following the map.

    A pixel gets `alpha * value` of the colour: the image is untouched where the map is 0 and
    covered at `alpha` where it is 1, as `ramp_alpha` draws the worker's layers.

    Args:
        image: (H, W, 3) uint8 RGB.
        heatmap: 2-D map in [0, 1]; resized bilinearly to the image if its size differs.
        alpha: opacity of the colour layer where the map is 1.
        cmap: sequential colour map (GRADCAM_CMAP by default).

    Returns:
        (H, W, 3) uint8 RGB, the same size as the image.

    Raises:
        ValueError: for bad shapes, dtypes, opacity or colour map names.
    """
    image = _check_image(image)
    _check_alpha(alpha)
    heatmap = _check_map(heatmap, image)
    colours = colorize(heatmap, cmap).astype(np.float32)
    weight = alpha * np.clip(heatmap, 0.0, 1.0)[..., np.newaxis]
    blended = (1.0 - weight) * image.astype(np.float32) + weight * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def symmetric_limit(values: np.ndarray) -> float:
    """max |value|, the half-width of a symmetric colour scale (1.0 for an all-zero map so that
    the scale stays valid and the map draws as white)."""
    vmax = float(np.max(np.abs(values))) if np.size(values) else 0.0
    return vmax if vmax > 0 else 1.0


def overlay_signed(
    image: np.ndarray, values: np.ndarray, vmax: float | None = None, alpha: float = 0.7, cmap: str = SHAP_CMAP
) -> np.ndarray:
    """Draw signed attributions (e.g. SHAP) red/blue over a faded greyscale copy of the image.

    The colour layer's opacity grows with |value| / vmax, so pixels with no attribution show the
    image and the strongest ones show their pure colour at `alpha`.

    Args:
        image: (H, W, 3) uint8 RGB.
        values: 2-D signed map; resized bilinearly to the image if its size differs.
        vmax: half-width of the symmetric scale; None uses max |value|.
        alpha: opacity of the strongest attributions.
        cmap: diverging colour map centred on a light neutral (SHAP_CMAP by default).

    Returns:
        (H, W, 3) uint8 RGB, the same size as the image.

    Raises:
        ValueError: for bad shapes, dtypes, opacity, colour map or a non-positive vmax.
    """
    image = _check_image(image)
    _check_alpha(alpha)
    values = _check_map(values, image)
    vmax = symmetric_limit(values) if vmax is None else float(vmax)
    if not vmax > 0:
        raise ValueError(f"vmax must be positive, got {vmax}.")
    colours = colorize(values, cmap, -vmax, vmax).astype(np.float32)
    grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB).astype(np.float32)
    background = 0.5 * grey + 0.5 * 255.0  # faded, so the colours stand out
    weight = alpha * np.clip(np.abs(values) / vmax, 0.0, 1.0)[..., np.newaxis]
    blended = (1.0 - weight) * background + weight * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def with_colorbar(
    picture: np.ndarray, cmap: str, vmin: float, vmax: float, label: str = "", dpi: int = 100
) -> np.ndarray:
    """Render an RGB picture next to a vertical colour bar for the given scale.

    Args:
        picture: (H, W, 3) uint8 RGB, e.g. from `overlay_heatmap`.
        cmap: the colour map the picture was drawn with.
        vmin: the scale's lower end.
        vmax: the scale's upper end.
        label: text along the colour bar.
        dpi: pixels per inch of the rendered figure (the picture keeps roughly its own size).

    Returns:
        (H', W', 3) uint8 RGB, somewhat wider than the picture.

    Raises:
        ValueError: for a bad picture, scale or colour map.
    """
    picture = _check_image(picture)
    if not vmax > vmin:
        raise ValueError(f"The colour scale needs vmax > vmin, got vmin={vmin} and vmax={vmax}.")
    h, w = picture.shape[:2]
    height_in = max(h / dpi, 2.0)
    picture_in = 0.92 * height_in * w / h  # the picture fills 92% of the height, aspect kept
    fig_w = picture_in + 1.05  # room for the bar and its tick labels
    fig = Figure(figsize=(fig_w, height_in), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0.05 / fig_w, 0.04, picture_in / fig_w, 0.92))
    ax.imshow(picture, interpolation="nearest")
    ax.set_axis_off()
    cax = fig.add_axes(((0.05 + picture_in + 0.12) / fig_w, 0.1, 0.14 / fig_w, 0.8))
    mappable = ScalarMappable(norm=Normalize(vmin, vmax), cmap=_colormap(cmap))
    bar = fig.colorbar(mappable, cax=cax)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def heatmap_with_colorbar(
    image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.8, cmap: str = GRADCAM_CMAP, label: str = "Grad-CAM"
) -> np.ndarray:
    """`overlay_heatmap` plus a 0-1 colour bar, as one uint8 RGB picture."""
    return with_colorbar(overlay_heatmap(image, heatmap, alpha, cmap), cmap, 0.0, 1.0, label)


def signed_with_colorbar(
    image: np.ndarray, values: np.ndarray, vmax: float | None = None, alpha: float = 0.7, label: str = "SHAP value"
) -> np.ndarray:
    """`overlay_signed` plus a symmetric [-vmax, vmax] red/blue colour bar."""
    vmax = symmetric_limit(_check_map(values)) if vmax is None else float(vmax)
    return with_colorbar(overlay_signed(image, values, vmax, alpha), SHAP_CMAP, -vmax, vmax, label)


def encode_png(picture: np.ndarray) -> bytes:
    """PNG bytes of a uint8 RGB picture (lossless, for storage or an HTTP response).

    Raises:
        ValueError: for a picture that is not HxWx3 uint8.
    """
    picture = _check_image(picture)
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("OpenCV could not encode the picture as PNG.")
    return buffer.tobytes()
