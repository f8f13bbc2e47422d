"""Explanations: the Grad-CAM rows of the prediction pass, SHAP and requested Grad-CAM maps, and the
one function that stores an explanation (`store_explanation`).

- A prediction (worker.batching) computes the Grad-CAM map of the predicted class in its own forward
  pass; `record_prediction_pass` stores it and creates `queued` SHAP rows for the top SHAP_TOP_K
  classes, whose task `worker.tasks.explain_shap` is sent after the commit (`send_shap`).
- `run_shap(task, analysis_id)` computes every queued SHAP row of an analysis in one Partition-SHAP
  run (the classes share the masked evaluations), giving way to predictions (worker.priority).
- `run_gradcam(explanation_id)` computes a requested Grad-CAM / Grad-CAM++ map.

Each row goes queued -> running -> done | failed (claims and failures: worker.recovery); every
exception, the soft time limit included, ends in `failed` with its reason.

Files: the raw map as .npy (np.save; Grad-CAM float16, SHAP float32: `map_dtype`) at the model's
input resolution, never larger (a 6000x6000 upload once cost 144 MB of float32 per map), and a PNG colour layer drawn from that same
map (Grad-CAM: inferno, opacity following the map; SHAP: red/blue on a symmetric scale, alpha growing with
|value|) that the case page stretches over the original, with an opacity slider.
"""

from __future__ import annotations

import io
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image as PILImage
from sqlalchemy import insert, select

from webapp.cases.deletion import lock_images
from webapp.cases.explanations import explanation_keys
from webapp.db import db
from webapp.models import Analysis, Explanation, Image, utcnow
from webapp.queue import EXPLAIN_QUEUE
from webapp.states import AnalysisStatus, ExplanationMethod, ExplanationStatus
from webapp.storage import storage_from_settings

from . import priority
from .celery_app import GRADCAM_TASK, SHAP_TASK, consumes, current_settings, send
from .predict import batch_limit, explainable, predictor_for_version, read_image
from .recovery import ImageDeleted, claim_explanations, fail_explanations, run_explanations

if TYPE_CHECKING:
    from ml.predictor import Predictor

log = logging.getLogger(__name__)

GradCam = tuple[int | None, np.ndarray | None, str | None]  # (class index, map, None) or (None, None, reason)
RowKey = tuple[int, str, str]  # (image_id, method, class_name)


def gradcam_method(plus_plus: bool) -> ExplanationMethod:
    return ExplanationMethod.GRADCAM_PLUS_PLUS if plus_plus else ExplanationMethod.GRADCAM


# --- files --------------------------------------------------------------------------------------------


def map_dtype(method: str) -> type[np.floating]:
    """Grad-CAM maps lie in [0, 1]: float16's 3 significant digits are plenty. SHAP values are
    shares of a probability spread over the pixels (about 1e-5 each at 120x160), below float16's
    normal range: they stay float32 (77 KB at 120x160)."""
    return np.float32 if method == ExplanationMethod.SHAP else np.float16


def stored_map(values: np.ndarray, size: tuple[int, int], dtype: type[np.floating] = np.float16) -> np.ndarray:
    """The map as stored: at most `size` = (H, W), the model's input resolution (area-averaged when
    it was computed at the upload's size), as `dtype`. A map stored already (of `dtype`, within
    `size`) is returned as it is: the prediction pass stores the maps it drew its layers from."""
    h, w = size
    if isinstance(values, np.ndarray) and values.dtype == dtype and values.shape[0] <= h and values.shape[1] <= w:
        return values
    values = np.asarray(values, dtype=np.float32)
    if values.shape[0] > h or values.shape[1] > w:
        values = cv2.resize(values, (w, h), interpolation=cv2.INTER_AREA)
    limit = float(np.finfo(dtype).max)
    return np.clip(values, -limit, limit).astype(dtype)


def npy_bytes(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def rgba_png(rgb: np.ndarray, alpha: np.ndarray) -> bytes:
    rgba = np.dstack([np.asarray(rgb, dtype=np.uint8), np.asarray(alpha, dtype=np.uint8)])
    buffer = io.BytesIO()
    PILImage.fromarray(rgba, "RGBA").save(buffer, format="PNG", compress_level=1)  # 3x faster than the default 6
    return buffer.getvalue()


def gradcam_layer_png(heatmap: np.ndarray, cmap: str | None = None) -> bytes:
    """The Grad-CAM colour layer (GRADCAM_CMAP unless given), its opacity following the map: at CSS
    opacity a it looks like overlay_heatmap(alpha=a).

    A palette PNG whose table is the colour map and whose transparency table is `ramp_alpha`: the
    same colours as colorize(), written in 0.5 ms instead of 2 ms per map (RGBA), on the critical
    path of every prediction."""
    from ml.explain.overlay import GRADCAM_CMAP, colour_indices, ramp_alpha  # loads TensorFlow: after the fork

    indices, palette = colour_indices(heatmap, cmap or GRADCAM_CMAP, 0.0, 1.0)
    layer = PILImage.fromarray(indices, "P")
    layer.putpalette(palette.tobytes())
    buffer = io.BytesIO()
    layer.save(buffer, format="PNG", compress_level=1, transparency=ramp_alpha(len(palette)).tobytes())
    return buffer.getvalue()


def gradcam_cmap() -> str:
    """The colour map the Grad-CAM layers are drawn with (recorded in each row's params)."""
    from ml.explain.overlay import GRADCAM_CMAP  # ml.explain loads TensorFlow: never before the fork

    return GRADCAM_CMAP


def shap_layer_png(values: np.ndarray, vmax: float) -> bytes:
    """SHAP values red (for the class) / blue (against) in SHAP_CMAP, alpha growing with |value| / vmax."""
    from ml.explain.overlay import SHAP_CMAP, colorize  # ml.explain loads TensorFlow: never before the fork

    colours = colorize(values, SHAP_CMAP, -vmax, vmax)
    alpha = np.clip(np.abs(values) / vmax, 0.0, 1.0) * 255.0
    return rgba_png(colours, np.rint(alpha).astype(np.uint8))


Layer = Callable[[np.ndarray], bytes]


def store_explanation(
    row: Explanation,
    image: Image,
    values: np.ndarray,
    layer: Layer | bytes,
    size: tuple[int, int],
    params: dict[str, Any] | None = None,
) -> None:
    """Saves the raw map and its colour layer under the row's keys and marks it done (the caller commits).

    Every explanation (Grad-CAM of the prediction pass, requested Grad-CAM, SHAP) is stored here.

    Args:
        values: the map, at the model's resolution or larger (it is stored at most at `size`).
        layer: draws the PNG colour layer from the stored map; or those bytes, drawn already from
            `stored_map(values, size)` (the prediction pass draws them in a thread pool).
        size: (H, W), the model's input resolution.
    """
    values = stored_map(values, size, map_dtype(row.method))
    overlay_png = layer(values) if callable(layer) else layer
    storage = storage_from_settings(current_settings())
    raw_key, overlay_key = explanation_keys(image.content_hash, row.model_version_id, row.method, row.class_name)
    storage.save(raw_key, npy_bytes(values))
    storage.save(overlay_key, overlay_png)
    row.raw_key, row.overlay_key = raw_key, overlay_key
    row.params = {**(row.params or {}), **(params or {}), "shape": [int(s) for s in values.shape]}
    row.status, row.error, row.finished_at = ExplanationStatus.DONE, None, utcnow()


# --- rows after a prediction ------------------------------------------------------------------------


class _Rows:
    """The explanation rows of some analyses of one model version: those stored (one query) and the
    ones created here, which `add_new` or `insert_new` writes.

    New rows are built apart from the session: the prediction pass writes all of its rows with one
    INSERT (`insert_new`), where the ORM would send one INSERT per row to fetch each new id (SQLite
    cannot return the ids of a multi-row INSERT in order), and it needs none of those ids."""

    def __init__(self, analyses: Sequence[Analysis]):
        db.session.flush()  # new analyses get their ids, which their new rows refer to
        self.rows: dict[RowKey, Explanation] = {
            (r.image_id, r.method, r.class_name): r
            for r in db.session.scalars(
                select(Explanation).where(
                    Explanation.image_id.in_([a.image_id for a in analyses]),
                    Explanation.model_version_id == analyses[0].model_version_id,
                )
            )
        }
        self.new: list[Explanation] = []

    def get(self, analysis: Analysis, method: str, class_name: str) -> Explanation | None:
        return self.rows.get((analysis.image_id, method, class_name))

    def row_for(self, analysis: Analysis, method: str, class_name: str, **fields: Any) -> Explanation:
        """The row of (analysis, method, class), created with `fields` if there is none yet."""
        row = self.get(analysis, method, class_name)
        if row is None:
            row = Explanation(
                analysis_id=analysis.id,
                image_id=analysis.image_id,
                model_version_id=analysis.model_version_id,
                method=method,
                class_name=class_name,
                **fields,
            )
            self.rows[(analysis.image_id, method, class_name)] = row
            self.new.append(row)
        return row

    def add_new(self) -> None:
        """Adds the new rows to the session: the caller's commit inserts them and gives them ids."""
        db.session.add_all(self.new)
        self.new = []

    def insert_new(self) -> None:
        """Inserts the new rows, one statement for the rows that set the same columns (the caller
        commits); they get no ids here."""
        table = Explanation.__table__
        columns = [column.key for column in table.columns]
        alike: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in self.new:
            values = {key: value for key in columns if (value := getattr(row, key)) is not None}
            alike.setdefault(tuple(values), []).append(values)
        for rows in alike.values():
            db.session.execute(insert(table), rows)  # Core: no per-row ORM bookkeeping
        self.new = []


def _queue_shap_rows(rows: _Rows, analysis: Analysis) -> bool:
    """`queued` SHAP rows for the top SHAP_TOP_K classes; whether any of them is queued (to send)."""
    settings = current_settings()
    ranked = sorted(analysis.probabilities, key=analysis.probabilities.get, reverse=True)
    pending = False
    for class_name in ranked[: int(settings.SHAP_TOP_K)]:
        row = rows.row_for(
            analysis,
            ExplanationMethod.SHAP,
            class_name,
            status=ExplanationStatus.QUEUED,
            params={"max_evals": int(settings.SHAP_MAX_EVALS)},
        )
        pending = pending or row.status == ExplanationStatus.QUEUED
    return pending


def record_prediction_pass(
    analyses: Sequence[Analysis],
    gradcams: Sequence[GradCam],
    overlays: Sequence[bytes | BaseException | None],
    class_names: Sequence[str],
    size: tuple[int, int],
) -> list[int]:
    """The Grad-CAM rows of a prediction pass (done, or failed with the reason: a storage problem never
    costs the prediction) and the queued SHAP rows of the top SHAP_TOP_K classes, added to the session:
    the caller commits them with the rest of the micro-batch, then sends the SHAP tasks (`send_shap`).

    Args:
        analyses: the succeeded analyses of one model version.
        gradcams: per analysis, `(class_index, map, None)` or `(None, None, reason)`.
        overlays: per analysis, the colour layer of `stored_map(map, size)` (`gradcam_layer_png`)
            or the error encoding it.
        class_names: the model version's classes.
        size: (H, W), the model's input resolution: the maps are stored at it.

    Returns:
        The analyses that have queued SHAP rows (their ids are known once the caller commits).
    """
    method = gradcam_method(bool(current_settings().GRADCAM_PLUS_PLUS))
    params = {"in_prediction_pass": True, "cmap": gradcam_cmap(), "range": [0.0, 1.0]}  # once: an import per call
    rows = _Rows(analyses)
    for analysis, (index, heatmap, error), overlay in zip(analyses, gradcams, overlays):
        class_name = class_names[index] if error is None else analysis.top_class
        row = rows.row_for(analysis, method, class_name, attempts=0)
        if row.status != ExplanationStatus.DONE:  # never overwritten
            row.attempts, row.started_at = (row.attempts or 0) + 1, utcnow()
            if error is None and isinstance(overlay, BaseException):
                error = f"{overlay.__class__.__name__}: {overlay}"
            if error is None:
                t0 = time.perf_counter()
                try:
                    store_explanation(row, analysis.image, heatmap, overlay, size, params)
                    row.timings = {"store_ms": round((time.perf_counter() - t0) * 1000, 1)}
                except SoftTimeLimitExceeded:
                    raise
                except Exception as exc:
                    log.error("Could not store the Grad-CAM map:\n%s", traceback.format_exc())
                    error = f"{exc.__class__.__name__}: {exc}"
            if error is not None:
                row.status, row.error, row.finished_at = ExplanationStatus.FAILED, error[:4000], utcnow()
    pending = [analysis for analysis in analyses if _queue_shap_rows(rows, analysis)]
    rows.insert_new()
    return pending


def send_shap(analysis_ids: Sequence[int]) -> None:
    """Sends `worker.tasks.explain_shap` for the analyses (after their rows were committed): one
    message for a micro-batch's analyses, which `run_shap` explains one per delivery."""
    if analysis_ids:
        send(SHAP_TASK, *analysis_ids)


FollowUp = tuple[str, Explanation | Analysis]  # (task name, row whose id the message carries)


def queue_followups(model: Predictor, analyses: Sequence[Analysis]) -> list[FollowUp]:
    """For analyses stored earlier (a repeated job reuses them): queued SHAP rows for the top-k
    classes, and a queued Grad-CAM row for the top class if the prediction pass left none (older
    analyses), added to the session with one query for all. The caller commits them with the rest
    of the micro-batch, then sends the returned messages (`send_followups`). Nothing for a model
    without a Keras model to explain; a failure is logged (the prediction is stored: a lost SHAP
    request must not fail the job)."""
    analyses = [a for a in analyses if a.status == AnalysisStatus.SUCCEEDED and a.probabilities]
    if not explainable(model) or not analyses:
        return []
    rows = _Rows(analyses)
    messages: list[FollowUp] = []
    for analysis in analyses:
        try:
            messages += _queue_followups(rows, analysis)
        except Exception:
            log.exception("Could not queue the explanations of analysis %s.", analysis.id)
    rows.add_new()  # the messages carry the new Grad-CAM rows' ids
    return messages


def _queue_followups(rows: _Rows, analysis: Analysis) -> list[FollowUp]:
    shap_pending = _queue_shap_rows(rows, analysis)
    gradcam = (
        rows.get(analysis, ExplanationMethod.GRADCAM, analysis.top_class)
        or rows.get(analysis, ExplanationMethod.GRADCAM_PLUS_PLUS, analysis.top_class)
        or rows.row_for(analysis, ExplanationMethod.GRADCAM, analysis.top_class, status=ExplanationStatus.QUEUED)
    )
    messages: list[FollowUp] = []
    if gradcam.status == ExplanationStatus.QUEUED:
        messages.append((GRADCAM_TASK, gradcam))
    if shap_pending:
        messages.append((SHAP_TASK, analysis))
    return messages


def send_followups(messages: Sequence[FollowUp] | None) -> None:
    """Sends the messages of `queue_followups` (after their rows were committed), the SHAP ones as
    one message (`send_shap`)."""
    messages = messages or ()
    for task_name, row in messages:
        if task_name != SHAP_TASK:
            send(task_name, row.id)
    send_shap([row.id for task_name, row in messages if task_name == SHAP_TASK])


# --- SHAP and requested Grad-CAM ------------------------------------------------------------------------


def model_for(row: Explanation) -> Predictor:
    """The predictor of the row's model version: the served one, or one loaded from its artifact.

    Re-runs with another model version store analyses of that version; their explanations must
    come from the same weights, so the worker loads (and caches) that version like analyse does.
    """
    mv = row.model_version
    model = predictor_for_version(mv)
    if not explainable(model):
        raise RuntimeError("This worker's predictor has no Keras model to explain.")
    name, version = str(model.manifest["name"]), str(model.manifest["version"])
    if (mv.name, mv.version) != (name, version):
        raise RuntimeError(f"This worker serves {name} {version}, not {mv.name} {mv.version}.")
    return model


def run_shap(task: Task, analysis_id: int, more_analysis_ids: Sequence[int] = ()) -> str:
    """SHAP maps for every queued SHAP row of the analysis (one Partition-explainer run for all).

    A micro-batch sends its analyses in one message: the first is explained here, the others are
    passed on first in one message of their own (another pool process may take it at once). While
    predictions wait, the whole message is deferred as one. A killed worker's message comes back
    whole (late acknowledgement): a repeated analysis finds its rows claimed or done.

    Returns:
        "done", "failed", "deferred" (predictions are waiting), "nothing to do", "missing" or "deleted".
    """
    waiting = priority.should_defer(task)  # SHAP never delays a prediction on a worker that also serves predict
    if waiting:
        db.session.remove()
        return priority.defer(task, [analysis_id, *more_analysis_ids], waiting)
    if more_analysis_ids:
        send_shap(more_analysis_ids)
    analysis = db.session.get(Analysis, analysis_id)
    if analysis is None:
        return "missing"
    rows = db.session.scalars(
        select(Explanation)
        .where(Explanation.analysis_id == analysis_id, Explanation.method == ExplanationMethod.SHAP)
        .order_by(Explanation.id)
    ).all()
    claimed = claim_explanations(rows)
    if not claimed:
        db.session.remove()
        return "nothing to do"
    ids = [r.id for r in claimed]
    try:
        return run_explanations(ids, lambda: compute_shap(analysis, claimed, task))
    except priority.PredictionsWaiting:  # uploads arrived mid-computation: give the CPU back
        return priority.requeue_explanations(task, analysis_id, ids)  # the others went on before


def compute_shap(analysis: Analysis, rows: Sequence[Explanation], task: Task | None = None) -> None:
    """Computes and stores the SHAP maps of `rows` (claimed, one analysis), one scale for all; commits."""
    # ml.explain loads TensorFlow: never before the fork
    from ml.explain.gradcam import predictor_temperature
    from ml.explain.shap_explainer import (
        DEFAULT_REGIONS,
        default_blur,
        probability_function,
        resize_values,
        shap_values,
    )

    model = model_for(rows[0])
    settings = current_settings()
    t0 = time.perf_counter()
    pixels = read_image(analysis.image.storage_key)
    indices = [model.class_names.index(r.class_name) for r in rows]
    max_evals, batch_size = int(settings.SHAP_MAX_EVALS), int(settings.SHAP_BATCH_SIZE)
    blur = default_blur(*model.input_size)
    t1 = time.perf_counter()
    fn = probability_function(model.model, predictor_temperature(model))
    if task is not None:
        fn = priority.yielding(fn, task)  # stops between model batches when predictions are waiting
    result = shap_values(
        fn, model.preprocess(pixels), max_evals=max_evals, batch_size=batch_size, class_indices=indices, blur=blur
    )
    t2 = time.perf_counter()
    maps = [resize_values(v, model.input_size) for v in result.values]  # stored at the model's resolution
    vmax = max(float(np.max(np.abs(m))) for m in maps) or 1.0  # one scale for every class of the image
    lock_image(analysis.image_id)
    for row, values, base in zip(rows, maps, result.base_values):
        index = model.class_names.index(row.class_name)
        store_explanation(
            row,
            analysis.image,
            values,
            lambda stored: shap_layer_png(stored, vmax),
            model.input_size,
            {
                "max_evals": max_evals,
                "batch_size": batch_size,
                "blur": blur,
                "regions": DEFAULT_REGIONS,
                "vmax": vmax,
                "base_value": float(base),
                "probability": float(result.probs[index]),
                "sum": float(np.sum(values)),
                "units": "probability, summed over colour channels",
            },
        )
        row.timings = {
            "load_image_ms": round((t1 - t0) * 1000, 1),
            "shap_ms": round((t2 - t1) * 1000, 1),
            "store_ms": round((time.perf_counter() - t2) * 1000, 1),
        }
    db.session.commit()


def lock_image(image_id: int) -> None:
    """Locks the image row until the commit that stores its maps (webapp.cases.deletion).

    Raises:
        ImageDeleted: the case was deleted while the map was computed; no file is written.
    """
    if not lock_images([image_id]):
        raise ImageDeleted(image_id)


def run_gradcam(explanation_id: int) -> str:
    """A requested Grad-CAM or Grad-CAM++ map for the row's class.

    Returns:
        "done", "failed", "missing", "deleted", or the row's status when it is not this delivery's to compute.
    """
    row = db.session.get(Explanation, explanation_id)
    if row is None:
        return "missing"
    if row.method not in (ExplanationMethod.GRADCAM, ExplanationMethod.GRADCAM_PLUS_PLUS):
        fail_explanations([row.id], f"{GRADCAM_TASK} cannot compute {row.method!r} explanations.")
        return ExplanationStatus.FAILED
    if not claim_explanations([row]):
        status = row.status
        db.session.remove()
        return status
    return run_explanations([row.id], lambda: compute_gradcam(row))


def compute_gradcam(row: Explanation) -> None:
    """Computes and stores the Grad-CAM(++) map of the row's class (claimed); commits."""
    # ml.data and ml.explain load TensorFlow: never before the fork
    from ml.data import resize_image
    from ml.explain import explain_gradcam

    model = model_for(row)
    t0 = time.perf_counter()
    # At the model's input size, as the prediction pass explains its images (worker.batching): the
    # map comes out at the resolution it is stored at, as SHAP's do.
    pixels = resize_image(read_image(row.image.storage_key), model.input_size)
    t1 = time.perf_counter()
    result = explain_gradcam(
        model, [pixels], row.class_name, plus_plus=row.method == ExplanationMethod.GRADCAM_PLUS_PLUS
    )
    t2 = time.perf_counter()
    heatmap = result.maps[0]
    lock_image(row.image_id)
    store_explanation(
        row,
        row.image,
        heatmap,
        gradcam_layer_png,
        model.input_size,
        {
            "in_prediction_pass": False,
            "cmap": gradcam_cmap(),
            "range": [0.0, 1.0],
            "probability": float(result.probs[0][int(result.class_indices[0])]),
        },
    )
    row.timings = {
        "load_image_ms": round((t1 - t0) * 1000, 1),
        "gradcam_ms": round((t2 - t1) * 1000, 1),
        "store_ms": round((time.perf_counter() - t2) * 1000, 1),
    }
    db.session.commit()


def warm_up_shap(model: Predictor) -> float | None:
    """Imports shap (3 s) and traces the SHAP model function at each padded batch size up to
    PREDICT_BATCH_SIZE (`ml.explain.shap_explainer.bucket_sizes`), on a
    worker that serves the explain queue: a SHAP run can only give way to a prediction between two
    model calls, so its first call must not be a 10-20 s trace. None when there is nothing to do."""
    settings = current_settings()
    if int(settings.SHAP_TOP_K) <= 0 or not explainable(model) or not consumes(EXPLAIN_QUEUE):
        return None
    started = time.monotonic()
    # Called in worker_process_init, after the fork; shap pulls in numba and scikit-learn.
    import shap  # noqa: F401

    # ml.explain loads TensorFlow: never before the fork
    from ml.explain.gradcam import predictor_temperature
    from ml.explain.shap_explainer import bucket_sizes, default_blur, probability_function, shap_values

    fn = probability_function(model.model, predictor_temperature(model))
    h, w = model.input_size
    chunk = min(batch_limit(), int(settings.SHAP_BATCH_SIZE))
    for size in bucket_sizes(chunk):  # the chunks of priority.yielding(), padded to these sizes
        fn(np.full((size, h, w, 3), 128, dtype=np.float32))
    # A small explanation compiles shap's numba code (~5-7 s the first time), which no check can interrupt.
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3)).astype(np.float32)
    shap_values(fn, image, max_evals=4 * chunk, batch_size=chunk, class_indices=[0], blur=default_blur(h, w))
    return time.monotonic() - started
