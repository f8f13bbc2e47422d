"""Micro-batching of predictions: what `worker.tasks.analyse` does with its claimed job.

Why: one EfficientNetB3 forward pass on 2 CPU cores costs ~0.1 s for one image but ~0.035 s per
image in a batch of 16, and everything around the model (Celery, the database, PNG decoding) is
cheap next to it. So when `worker.tasks.analyse(job_id)` runs, it also *claims* up to
PREDICT_BATCH_SIZE - 1 further `queued` analyse jobs of the same model version (oldest first, in one
conditional UPDATE inside the lead's own claim transaction, worker.recovery.claim, so no two
deliveries or workers take the same job), decodes their stored PNGs in a small thread pool (at the
model's input size), runs ONE forward pass that gives the calibrated probabilities, the Grad-CAM
maps and the pooled embeddings of all of them (`ml.explain.explain_gradcam`; the embeddings feed
`worker.similarity`), and stores every result in ONE transaction (`_store`: analyses, embeddings and
verdicts, explanation rows, the jobs' ends; the new explanation rows go in as one INSERT per kind,
the new analyses as one INSERT where the database returns their ids in order, PostgreSQL, not
SQLite). A micro-batch thus costs two commits whatever its size: the claim, which must be committed
before the pass so that a killed worker's jobs are found again, and the results. A folder upload
sends one message per PREDICT_BATCH_SIZE jobs (webapp.queue.send_grouped) and the jobs a message
lists are taken first, so a folder costs one delivery per batch; a listed job that this batch could
not take is sent on its own afterwards. The messages of jobs taken along otherwise (single uploads)
find their job finished and return at once (claim is idempotent). With PREDICT_BATCH_SIZE=1 the same
path runs one job per pass.

Batches are padded (by repeating the last image) to a few fixed sizes (1, 2, 4, 8, 16, ...
up to PREDICT_BATCH_SIZE), so that the compiled pass only ever sees those shapes: oneDNN builds its
kernels per shape, which costs 0.3-1.5 s the first time a size is seen. `warm_up` runs each size
once in `worker_process_init` (worker.process), so the first real upload does not pay for tracing
(20-40 s cold).
"""

from __future__ import annotations

import functools
import logging
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select

from webapp.cases.deletion import lock_images
from webapp.db import db
from webapp.models import Analysis, Image, Job, ModelVersion, utcnow
from webapp.queue import ANALYSE_TASK, PREDICT_QUEUE
from webapp.states import AnalysisStatus, JobKind, JobStatus
from webapp.storage import Storage, storage_from_settings

from . import explain, predict, recovery, similarity
from .celery_app import current_settings, send

if TYPE_CHECKING:
    from ml.predictor import Predictor

log = logging.getLogger(__name__)

_pool: ThreadPoolExecutor | None = None
DECODE_THREADS = 2
GATHER_WAIT_S = 0.05  # a small batch waits this long (at most GATHER_ROUNDS times) while uploads stream in
GATHER_ROUNDS = 4
T = TypeVar("T")


# --- sizes ----------------------------------------------------------------------------------------


def bucket_sizes(limit: int) -> list[int]:
    """The padded batch sizes: powers of two below `limit`, then `limit` (e.g. 16 -> 1, 2, 4, 8, 16)."""
    sizes, size = [], 1
    while size < limit:
        sizes.append(size)
        size *= 2
    return sizes + [limit]


def padded_size(n: int, limit: int) -> int:
    """The smallest bucket that holds `n` images (n <= limit)."""
    return next(size for size in bucket_sizes(limit) if size >= n)


def pad(images: Sequence[T], size: int) -> list[T]:
    """`images` followed by copies of its last image, `size` in all (real pixels: no NaN, no zero maps)."""
    images = list(images)
    return images + [images[-1]] * (size - len(images))


# --- the batched pass -----------------------------------------------------------------------------


def predict_batch(
    model: Predictor, images: Sequence[np.ndarray], limit: int | None = None, plus_plus: bool = False
) -> tuple[np.ndarray, list[explain.GradCam] | None, np.ndarray | None]:
    """Probabilities, Grad-CAM maps and pooled embeddings of `images` from one padded forward pass.

    Args:
        model: an `ml.Predictor` (or a test double with `predict(list) -> (N, C)` only).
        images: HxWx3 uint8 RGB arrays, at most `limit` of them.
        limit: the largest batch (PREDICT_BATCH_SIZE by default).
        plus_plus: Grad-CAM++ instead of Grad-CAM.

    Returns:
        `(probs (N, C), gradcams, pooled)` where gradcams is None for a model without a Keras model
        to explain, else one `(class_index, map at the image's size, None)` per image, or
        `(None, None, reason)` for each image when the Grad-CAM pass failed (the probabilities then
        come from a plain forward pass: an explanation never costs the prediction); pooled is the
        (N, D) embedding from the same pass, None for a model that gives none (test doubles).
    """
    n = len(images)
    limit = limit or predict.batch_limit()
    padded = pad(images, padded_size(n, max(limit, n)))
    if not predict.explainable(model):
        probs, pooled = _plain(model, padded, n)
        return probs, None, pooled
    try:
        from ml.explain import explain_gradcam  # ml.explain loads TensorFlow: never before the fork

        result = explain_gradcam(model, padded, None, plus_plus=plus_plus, batch_size=len(padded))
        maps = [(int(c), m, None) for c, m in zip(result.class_indices[:n], result.maps[:n])]
        return result.probs[:n], maps, result.embeddings[:n]
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:
        log.error("Grad-CAM pass failed; predicting without it:\n%s", traceback.format_exc())
        reason = f"Grad-CAM failed: {exc.__class__.__name__}: {exc}"
        probs, pooled = _plain(model, padded, n)
        return probs, [(None, None, reason)] * n, pooled


def explain_chosen(
    model: Predictor,
    images: Sequence[np.ndarray],
    gradcams: list[explain.GradCam] | None,
    chosen: np.ndarray,
    metadata_used: np.ndarray,
) -> list[explain.GradCam] | None:
    """The pass's maps, each of the class finally chosen for its image.

    The pass explains the network's own decision; where the version's metadata head chose another
    class, that class's map is computed in one more padded pass over those images only.
    """
    if gradcams is None:
        return None
    redo = [
        i for i, (index, _, error) in enumerate(gradcams) if error is None and metadata_used[i] and index != chosen[i]
    ]
    if not redo:
        return gradcams
    maps = list(gradcams)
    padded = pad([images[i] for i in redo], padded_size(len(redo), max(predict.batch_limit(), len(redo))))
    names = pad([model.class_names[int(chosen[i])] for i in redo], len(padded))
    plus_plus = bool(current_settings().GRADCAM_PLUS_PLUS)
    try:
        from ml.explain import explain_gradcam  # ml.explain loads TensorFlow: never before the fork

        result = explain_gradcam(model, padded, names, plus_plus=plus_plus, batch_size=len(padded))
        for k, i in enumerate(redo):
            maps[i] = (int(result.class_indices[k]), result.maps[k], None)
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:
        log.error("Grad-CAM of the chosen classes failed:\n%s", traceback.format_exc())
        for i in redo:
            maps[i] = (None, None, f"Grad-CAM failed: {exc.__class__.__name__}: {exc}")
    return maps


def _plain(model: Predictor, padded: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(probs, pooled) of a pass without maps; the pooled embedding comes from the same call where the
    predictor gives it, else None."""
    if hasattr(model, "predict_with_embedding"):
        probs, pooled = model.predict_with_embedding(padded)
        return probs[:n], pooled[:n]
    return np.asarray(model.predict(padded))[:n], None


def warm_up(model: Predictor, limit: int | None = None) -> float:
    """Runs the prediction pass once at every padded batch size; returns the seconds it took."""
    started = time.monotonic()
    h, w = getattr(model, "input_size", (64, 64))
    image = np.full((h, w, 3), 128, dtype=np.uint8)
    for size in bucket_sizes(limit or predict.batch_limit()):
        predict_batch(model, [image] * size, limit, bool(current_settings().GRADCAM_PLUS_PLUS))
    return time.monotonic() - started


# --- claiming companions ----------------------------------------------------------------------------


def _candidates(lead: Job, model_version_id: int | None, count: int, listed: Sequence[int], among: bool) -> list:
    """(id, attempts) of up to `count` queued jobs that may join the lead's batch, oldest first:
    those in `listed` (among=True) or those not in it (among=False)."""
    same_version = (
        Job.model_version_id.is_(None) if model_version_id is None else Job.model_version_id == model_version_id
    )
    query = select(Job.id, Job.attempts).where(
        Job.status == JobStatus.QUEUED,
        Job.kind == lead.kind,
        Job.id != lead.id,
        same_version,
        Job.attempts < current_settings().TASK_MAX_ATTEMPTS,
    )
    if among:
        query = query.where(Job.id.in_(list(listed)))
    elif listed:
        query = query.where(Job.id.not_in(list(listed)))
    return list(db.session.execute(query.order_by(Job.id).limit(count)).all())


def claim_companions(
    lead: Job, model_version_id: int | None, count: int, now: datetime, listed: Sequence[int] = ()
) -> list[int]:
    """Claims up to `count` further queued analyse jobs of the same model version: those `listed` in
    the lead's message first, then the oldest others.

    One conditional UPDATE for all (worker.recovery.take_queued), so a job that another delivery or
    worker takes at the same moment is skipped. Not committed: returns the ids won.
    """
    if count <= 0:
        return []
    candidates = _candidates(lead, model_version_id, count, listed, among=True) if listed else []
    if len(candidates) < count:
        candidates += _candidates(lead, model_version_id, count - len(candidates), listed, among=False)
    return recovery.take_queued([job_id for job_id, _ in candidates], now)


class Companions:
    """The queued jobs an analyse delivery takes along into its micro-batch, those `listed` in its
    message first. `take` claims them in the lead's own claim transaction (worker.recovery.claim
    calls it), so that the whole micro-batch is claimed with one commit."""

    def __init__(self, listed: Sequence[int] = ()):
        self.listed = tuple(listed)
        self.ids: list[int] = []
        self.taken = False

    def take(self, lead: Job, now: datetime) -> None:
        self.ids = claim_companions(lead, lead.model_version_id, predict.batch_limit() - 1, now, self.listed)
        self.taken = True


def uploads_streaming(lead: Job, window: float = 0.5) -> bool:
    """Whether another analyse job was created in the last `window` seconds (a folder is being uploaded)."""
    since = utcnow() - timedelta(seconds=window)
    newest = db.session.scalar(
        select(Job.created_at).where(Job.kind == JobKind.ANALYSE, Job.id != lead.id).order_by(Job.id.desc()).limit(1)
    )
    return newest is not None and newest > since


def gather(lead: Job, version_id: int | None, count: int, companions: Companions) -> list[Job]:
    """The lead's companions as rows (one query): those claimed with the lead, and, while uploads
    stream in and the batch is less than half full, more: it waits GATHER_WAIT_S (up to
    GATHER_ROUNDS times) and claims what came, committed before the pass like every claim. The CPU
    goes to the uploads meanwhile, and a batch of 8 costs about as much as 3 single passes. A lone
    upload, or a folder's full batch, never waits."""
    if not companions.taken:  # called without worker.recovery.claim taking them along
        companions.take(lead, utcnow())
        db.session.commit()
    for _ in range(GATHER_ROUNDS):
        if len(companions.ids) + 1 > (count + 1) // 2 or not uploads_streaming(lead):
            break
        time.sleep(GATHER_WAIT_S)
        more = claim_companions(lead, version_id, count - len(companions.ids), utcnow())
        if more:
            db.session.commit()
            companions.ids += more
    if not companions.ids:
        return []
    query = select(Job).where(Job.id.in_(companions.ids)).order_by(Job.id)
    return list(db.session.scalars(query.execution_options(populate_existing=True)))


# --- one batch ---------------------------------------------------------------------------------------


def run_batch(lead: Job, companions: Companions | None = None) -> None:
    """analyse's work for the claimed job `lead` plus the queued jobs it takes along (`companions`,
    claimed with it, or here when None). Two transactions in all: the claim, committed before the
    pass so that a killed worker's jobs are found again (worker.recovery), and one that stores every
    result of the micro-batch (`_store`).

    Raises whatever ends the lead job (worker.recovery.run_job turns it into `failed` or a retry);
    the companions are failed (or, for transient errors, put back to `queued`) here first, so none
    is left `running`.
    """
    companions = companions or Companions()
    try:
        model, model_version = predict.predictor_for_job(lead)  # re-run jobs name their model version
        jobs = gather(lead, lead.model_version_id, predict.batch_limit() - 1, companions)
        _process([lead] + jobs, model, model_version)
    except BaseException as exc:
        if recovery.is_transient(exc):
            for job_id in companions.ids:
                recovery.release(job_id)
        elif isinstance(exc, SoftTimeLimitExceeded):
            recovery.fail_jobs(companions.ids, f"Timed out after {current_settings().TASK_SOFT_TIME_LIMIT} s.")
        else:
            recovery.fail_jobs(companions.ids, f"{exc.__class__.__name__}: {exc}")
        raise


def send_left_behind(listed: Sequence[int]) -> None:
    """Sends a message of its own for each listed job still `queued`: the batch message that named it
    is about to be acknowledged, and no delivery took it (another model version, more jobs than this
    worker's batch, or another delivery won the message's lead job and filled its pass without it).
    Without one it would wait for the sweep, a minute and more."""
    if not listed:
        return
    left = db.session.scalars(select(Job.id).where(Job.id.in_(list(listed)), Job.status == JobStatus.QUEUED)).all()
    for job_id in left:
        send(ANALYSE_TASK, job_id, queue=PREDICT_QUEUE)


def _process(jobs: list[Job], model: Predictor, model_version: ModelVersion) -> None:
    images = predict.images_to_predict(jobs, model_version)  # read only: nothing is written before the pass
    computed = _compute(images, model, model_version)
    shap_pending, followups = _store(jobs, images, computed, model, model_version)
    explain.send_shap([analysis.id for analysis in shap_pending])
    explain.send_followups(followups)


def _decoder_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:  # created on first use, i.e. after the fork
        _pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")
    return _pool


def _load(
    storage: Storage, storage_key: str, size: tuple[int, int] | None = None
) -> tuple[np.ndarray | None, float, Exception | None]:
    """(pixels or None, seconds, error or None): PNG decoding releases the GIL, so threads overlap.
    With `size`, the pixels come at that size, by the model's own resize (`ml.data.resize_image`)."""
    t0 = time.perf_counter()
    try:
        pixels = predict.read_image(storage_key, storage)
        if size is not None:
            from ml.data import resize_image  # ml.data loads TensorFlow: never before the fork

            pixels = resize_image(pixels, size)
        return pixels, time.perf_counter() - t0, None
    except Exception as exc:
        return None, time.perf_counter() - t0, exc


def _overlay(heatmap: np.ndarray | None, size: tuple[int, int]) -> tuple[np.ndarray | None, bytes | Exception | None]:
    """(the Grad-CAM map as stored, at the model's resolution; its colour layer as PNG bytes), or
    (None, the exception), computed in the thread pool. The stored map goes on to
    `explain.store_explanation`, which then has nothing left to resample."""
    if heatmap is None:
        return None, None
    try:
        values = explain.stored_map(heatmap, size)
        return values, explain.gradcam_layer_png(values)
    except Exception as exc:
        return None, exc


class Computed(NamedTuple):
    """What the micro-batch computed, before anything is stored."""

    loaded: list[tuple[np.ndarray | None, float, Exception | None]]  # per image: (pixels, seconds, error)
    passed: Pass | None  # the pass over the images that loaded, in order
    described: list[similarity.Described]  # per image that loaded


def _compute(images: list[Image], model: Predictor, model_version: ModelVersion) -> Computed:
    """Loads the images (in the decoder threads) and predicts those that loaded in one pass."""
    settings = current_settings()
    storage = storage_from_settings(settings)  # the decoder threads have no app context
    # The resize `Predictor.preprocess` would do, done once as each image is loaded: the pass, the
    # OOD statistics (worker.similarity) and the Grad-CAM maps, which then come out at the
    # resolution they are stored at, share it.
    size = tuple(model.input_size) if predict.explainable(model) else None
    load = functools.partial(_load, storage, size=size)
    loaded = list(_decoder_pool().map(load, [image.storage_key for image in images]))
    ok = [(image, pixels) for image, (pixels, _, error) in zip(images, loaded) if error is None]
    passed = _predict(model, [pixels for _, pixels in ok], [image for image, _ in ok], settings) if ok else None
    described = similarity.describe(passed.pooled if passed else None, [pixels for _, pixels in ok], model_version)
    return Computed(loaded, passed, described)


def _store(
    jobs: list[Job], images: list[Image], computed: Computed, model: Predictor, model_version: ModelVersion
) -> tuple[list[Analysis], list[explain.FollowUp]]:
    """Stores everything the micro-batch produced in ONE transaction: the analyses (new ones in one
    INSERT), their embeddings and verdicts, the explanation rows (Grad-CAM maps done, SHAP queued),
    the follow-up rows of analyses stored earlier, and the jobs' ends. Returns what to send once it
    is committed: the analyses with queued SHAP rows, and the follow-up messages."""
    # Locked from here to the commit: the results of a case deleted during the pass are dropped, and
    # a deletion that comes now waits, then removes them with the rest (webapp.cases.deletion).
    alive = lock_images(job.image_id for job in jobs)
    analyses = predict.analyses_of(alive, model_version)
    earlier = [a for a in analyses.values() if a.status == AnalysisStatus.SUCCEEDED]
    stored = _store_results(images, computed, analyses, alive, model_version)
    shap_pending = _store_pass(stored, computed.passed, model, model_version) if stored else []
    followups = explain.queue_followups(model, earlier)
    predict.finish_jobs([job for job in jobs if job.image_id in alive], analyses, model_version)
    db.session.commit()
    return shap_pending, followups


def _store_results(
    images: list[Image], computed: Computed, analyses: dict[int, Analysis], alive: set[int], model_version: ModelVersion
) -> list[tuple[int, Analysis, float]]:
    """Gives each predicted image still there its analysis (failed where its file could not be read)
    with its embedding; returns (position in the pass, analysis, load seconds) of those predicted.
    An analysis that succeeded meanwhile (another delivery) is kept as it is: never overwritten."""
    stored, position = [], -1
    for image, (_, seconds, error) in zip(images, computed.loaded):
        position += error is None
        current = analyses.get(image.id)
        if image.id not in alive or (current is not None and current.status == AnalysisStatus.SUCCEEDED):
            continue
        analysis = predict.analysis_for(analyses, image, model_version)
        if error is not None:
            message = f"{error.__class__.__name__}: {error}"
            log.error("Could not read image %s: %s", image.id, message)
            predict.fail_analysis(analysis, message)
            continue
        similarity.store(analysis, computed.described[position])
        stored.append((position, analysis, seconds))
    return stored


class Pass(NamedTuple):
    """What one batched pass gives, per image: the answer, its map (as stored, at the model's
    resolution) and the map's colour layer."""

    probs: np.ndarray
    chosen: np.ndarray  # top class indices
    metadata_used: np.ndarray
    gradcams: list[explain.GradCam] | None
    overlays: list[bytes | Exception | None] | None
    predict_ms: float
    pooled: np.ndarray | None  # the embeddings (worker.similarity)


def _predict(model: Predictor, images: list[np.ndarray], rows: list[Image], settings) -> Pass:
    """One batched pass over `images` (of the image `rows`), with their cases' metadata where the
    version has a metadata head."""
    t0 = time.perf_counter()
    probs, gradcams, pooled = predict_batch(model, images, plus_plus=settings.GRADCAM_PLUS_PLUS)
    probs, chosen, metadata_used = predict.answer_with_metadata(model, probs, rows)
    gradcams = explain_chosen(model, images, gradcams, chosen, metadata_used)
    predict_ms = round((time.perf_counter() - t0) * 1000, 1)
    overlays = None
    if gradcams is not None:
        drawn = list(
            _decoder_pool().map(
                functools.partial(_overlay, size=model.input_size),
                [heatmap if error is None else None for _, heatmap, error in gradcams],
            )
        )
        gradcams = [(index, values, error) for (index, _, error), (values, _) in zip(gradcams, drawn)]
        overlays = [layer for _, layer in drawn]
    log.info("Predicted %d image(s) in one pass of %.0f ms.", len(images), predict_ms)
    return Pass(probs, chosen, metadata_used, gradcams, overlays, predict_ms, pooled)


def _store_pass(
    stored: list[tuple[int, Analysis, float]], passed: Pass, model: Predictor, model_version: ModelVersion
) -> list[Analysis]:
    """Stores the pass's results of the analyses `stored` (with their positions in the pass); returns
    the analyses with SHAP to send (the caller commits)."""
    class_names = list(model_version.class_names)
    for i, analysis, seconds in stored:
        # predict_ms: the batched pass this image was part of.
        timings = {"load_image_ms": round(seconds * 1000, 1), "predict_ms": passed.predict_ms}
        used = passed.metadata_used[i]
        predict.store_prediction(analysis, passed.probs[i], passed.chosen[i], class_names, timings, used)
    if passed.gradcams is None:
        return []
    return explain.record_prediction_pass(
        [analysis for _, analysis, _ in stored],
        [passed.gradcams[i] for i, _, _ in stored],
        [passed.overlays[i] for i, _, _ in stored],
        class_names,
        model.input_size,
    )


__all__ = [
    "Companions",
    "run_batch",
    "send_left_behind",
    "predict_batch",
    "warm_up",
    "bucket_sizes",
    "padded_size",
    "pad",
]
