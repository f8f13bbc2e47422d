"""Explanation tasks (the `explain` queue) and the Grad-CAM step of the prediction pass.

- `worker.tasks.analyse` computes the Grad-CAM map of the predicted class in its own forward pass
  (`prediction_pass`), stores it with `store_explanation`, then calls `queue_followups`, which
  creates `queued` SHAP rows for the top SHAP_TOP_K classes and sends `worker.tasks.explain_shap`.
- `worker.tasks.explain_shap(analysis_id)` computes every queued SHAP row of an analysis in one
  Partition-SHAP run (the classes share the masked evaluations).
- `worker.tasks.explain_gradcam(explanation_id)` computes a requested Grad-CAM / Grad-CAM++ map.

Each row goes queued -> running -> done | failed; every exception (the soft time limit included)
ends in `failed` with its reason, and a `task_failure` handler covers the hard time limit. A row
left `running` by a worker that died is taken up again by the redelivered message once it is older
than TASK_TIME_LIMIT, at most MAX_ATTEMPTS times.

Files: the raw map as float32 .npy (np.save) at the stored image's height and width, and an RGBA
PNG colour layer (Grad-CAM: the jet colour map, opaque; SHAP: red/blue on a symmetric scale, alpha
growing with |value|) that the case page lays over the original with an opacity slider.
"""

from __future__ import annotations

import io
import logging
import time
import traceback
from datetime import timedelta
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import task_failure
from sqlalchemy import select

from webapp.cases.explanations import GRADCAM_TASK, SHAP_TASK, explanation_keys
from webapp.queue import EXPLAIN_QUEUE

from . import tasks as core

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3


def send(task_name: str, *args: Any, queue: str = EXPLAIN_QUEUE) -> str | None:
    """Publishes a task by name from the worker; None (logged) when the broker refuses."""
    try:
        return core.app.send_task(task_name, args=list(args), queue=queue).id
    except Exception as exc:
        log.warning("Could not send %s%s: %s", task_name, args, exc)
        return None


def explainable(predictor) -> bool:
    """Explanations need the Keras model behind the predictor (test doubles may have none)."""
    return getattr(predictor, "model", None) is not None and hasattr(predictor, "preprocess")


# --- computing --------------------------------------------------------------------------------------

def prediction_pass(predictor, pixels, plus_plus: bool = False):
    """Calibrated probabilities and the Grad-CAM map of the predicted class, from one forward pass.

    Returns:
        `(probs (C,), class_index, map (H, W) in [0, 1] at the image's size)`.
    """
    from ml.explain import explain_gradcam

    result = explain_gradcam(predictor, [pixels], None, plus_plus=plus_plus)
    return result.probs[0], int(result.class_indices[0]), result.maps[0]


def npy_bytes(values) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(values, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def rgba_png(rgb, alpha) -> bytes:
    import numpy as np
    from PIL import Image as PILImage

    rgba = np.dstack([np.asarray(rgb, dtype=np.uint8), np.asarray(alpha, dtype=np.uint8)])
    buffer = io.BytesIO()
    PILImage.fromarray(rgba, "RGBA").save(buffer, format="PNG", compress_level=1)  # 3x faster than the default 6
    return buffer.getvalue()


def gradcam_layer_png(heatmap, cmap: str = "jet") -> bytes:
    """The Grad-CAM colour map as an opaque layer: at CSS opacity a it looks like overlay_heatmap(alpha=a).

    A palette PNG whose table is the colour map: the same pixels as colorize(), written in 0.5 ms
    instead of 2 ms per map (RGBA), on the critical path of every prediction."""
    from PIL import Image as PILImage

    from ml.explain.overlay import colour_indices

    indices, palette = colour_indices(heatmap, cmap, 0.0, 1.0)
    layer = PILImage.fromarray(indices, "P")
    layer.putpalette(palette.tobytes())
    buffer = io.BytesIO()
    layer.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def shap_layer_png(values, vmax: float) -> bytes:
    """SHAP values red (for the class) / blue (against), alpha growing with |value| / vmax."""
    import numpy as np

    from ml.explain.overlay import colorize

    colours = colorize(values, "bwr", -vmax, vmax)
    alpha = np.clip(np.abs(values) / vmax, 0.0, 1.0) * 255.0
    return rgba_png(colours, np.rint(alpha).astype(np.uint8))


def store_explanation(row, image, values, overlay_png: bytes, params: dict | None = None) -> None:
    """Saves the raw map and overlay under the row's keys and marks it done (the caller commits)."""
    from webapp.storage import storage_from_settings

    storage = storage_from_settings(core.settings)
    raw_key, overlay_key = explanation_keys(image.content_hash, row.model_version_id, row.method, row.class_name)
    storage.save(raw_key, npy_bytes(values))
    storage.save(overlay_key, overlay_png)
    row.raw_key, row.overlay_key = raw_key, overlay_key
    row.params = {**(row.params or {}), **(params or {}), "shape": [int(s) for s in values.shape]}
    row.status, row.error, row.finished_at = "done", None, core._now()


def _find(analysis, method: str, class_name: str):
    from webapp.db import db
    from webapp.models import Explanation

    return db.session.scalar(select(Explanation).where(
        Explanation.image_id == analysis.image_id, Explanation.model_version_id == analysis.model_version_id,
        Explanation.method == method, Explanation.class_name == class_name,
    ))


def record_gradcam(analysis, class_name: str, heatmap, plus_plus: bool, error: str | None = None):
    """The Grad-CAM row of the prediction pass: stored and done, or failed with `error` or with the
    storage error. Never raises for a storage problem, so the prediction is kept (the caller commits)."""
    from webapp.db import db
    from webapp.models import Explanation

    method = "gradcam++" if plus_plus else "gradcam"
    row = _find(analysis, method, class_name)
    if row is None:
        row = Explanation(analysis=analysis, image_id=analysis.image_id, model_version_id=analysis.model_version_id,
                          method=method, class_name=class_name, attempts=0)
        db.session.add(row)
    elif row.status == "done":
        return row  # never overwritten
    row.attempts, row.started_at = (row.attempts or 0) + 1, core._now()
    if error is None:
        t0 = time.perf_counter()
        try:
            store_explanation(row, analysis.image, heatmap, gradcam_layer_png(heatmap),
                              {"in_prediction_pass": True, "cmap": "jet", "range": [0.0, 1.0]})
            row.timings = {"store_ms": round((time.perf_counter() - t0) * 1000, 1)}
            return row
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            log.error("Could not store the Grad-CAM map:\n%s", traceback.format_exc())
            error = f"{exc.__class__.__name__}: {exc}"
    row.status, row.error, row.finished_at = "failed", error[:4000], core._now()
    return row


def queue_followups(analysis_id: int) -> None:
    """After a stored prediction: queued SHAP rows for the top-k classes (sent to the explain queue),
    and a Grad-CAM row for the top class if the prediction pass left none (older analyses)."""
    from webapp.db import db
    from webapp.models import Analysis, Explanation

    analysis = db.session.get(Analysis, analysis_id)
    if analysis is None or analysis.status != "succeeded" or not analysis.probabilities:
        return
    top_k = int(core.settings.SHAP_TOP_K)
    ranked = sorted(analysis.probabilities, key=analysis.probabilities.get, reverse=True)
    shap_pending = False
    for class_name in ranked[:top_k]:
        row = _find(analysis, "shap", class_name)
        if row is None:
            row = Explanation(analysis=analysis, image_id=analysis.image_id, model_version_id=analysis.model_version_id,
                              method="shap", class_name=class_name, status="queued",
                              params={"max_evals": int(core.settings.SHAP_MAX_EVALS)})
            db.session.add(row)
        shap_pending = shap_pending or row.status == "queued"
    gradcam = _find(analysis, "gradcam", analysis.top_class) or _find(analysis, "gradcam++", analysis.top_class)
    if gradcam is None:
        gradcam = Explanation(analysis=analysis, image_id=analysis.image_id, model_version_id=analysis.model_version_id,
                              method="gradcam", class_name=analysis.top_class, status="queued")
        db.session.add(gradcam)
    db.session.commit()
    if gradcam.status == "queued":
        send(GRADCAM_TASK, gradcam.id)
    if shap_pending:
        send(SHAP_TASK, analysis.id)


# --- row state ----------------------------------------------------------------------------------------

def _claimable(row) -> bool:
    """Queued, or left running by a worker that died longer ago than the hard time limit."""
    if row.status == "queued":
        return True
    if row.status != "running" or row.started_at is None:
        return False
    return core._now() - row.started_at > timedelta(seconds=core.settings.TASK_TIME_LIMIT)


def _claim(rows) -> list:
    """Marks the claimable rows running (attempts + 1); rows out of attempts end failed."""
    from webapp.db import db

    claimed = []
    for row in rows:
        if not _claimable(row):
            continue
        if row.attempts >= MAX_ATTEMPTS:
            row.status, row.finished_at = "failed", core._now()
            row.error = f"Gave up after {row.attempts} attempts (the worker stopped during each)."
            continue
        row.status, row.started_at, row.attempts, row.error = "running", core._now(), row.attempts + 1, None
        claimed.append(row)
    db.session.commit()
    return claimed


def fail_rows(ids, message: str) -> None:
    """Ends the given rows `failed` with `message`, unless already done."""
    from webapp.db import db
    from webapp.models import Explanation

    db.session.rollback()
    for row_id in ids:
        row = db.session.get(Explanation, row_id)
        if row is not None and row.status != "done":
            row.status, row.error, row.finished_at = "failed", message[:4000], core._now()
    db.session.commit()


def _model_for(row):
    """The predictor of the row's model version: the served one, or one loaded from its artifact.

    Re-runs with another model version store analyses of that version; their explanations must
    come from the same weights, so the worker loads (and caches) that version like analyse does.
    """
    from types import SimpleNamespace

    mv = row.model_version
    model, _ = core.predictor_for_job(SimpleNamespace(model_version_id=mv.id, model_version=mv))
    if not explainable(model):
        raise RuntimeError("This worker's predictor has no Keras model to explain.")
    name, version = str(model.manifest["name"]), str(model.manifest["version"])
    if (mv.name, mv.version) != (name, version):
        raise RuntimeError(f"This worker serves {name} {version}, not {mv.name} {mv.version}.")
    return model


def _run_guarded(ids, work) -> str:
    """Runs `work()`; any error ends the rows failed with its reason. Returns 'done' or 'failed'."""
    from webapp.db import db

    try:
        work()
        return "done"
    except SoftTimeLimitExceeded:
        fail_rows(ids, f"Timed out after {core.settings.TASK_SOFT_TIME_LIMIT} s.")
    except Exception as exc:
        log.error("Explanation %s failed:\n%s", ids, traceback.format_exc())
        fail_rows(ids, f"{exc.__class__.__name__}: {exc}")
    finally:
        db.session.remove()
    return "failed"


# --- tasks ---------------------------------------------------------------------------------------------

@core.app.task(name=SHAP_TASK, bind=True)
def shap(self, analysis_id: int) -> str:
    """SHAP maps for every queued SHAP row of the analysis (one Partition-explainer run for all)."""
    from webapp.db import db
    from webapp.models import Analysis, Explanation

    with core.flask_app().app_context():
        analysis = db.session.get(Analysis, analysis_id)
        if analysis is None:
            return "missing"
        from . import batching  # SHAP never delays a prediction on a worker that also serves predict

        waiting = batching.should_defer(self)
        if waiting:
            db.session.remove()
            return batching.defer(self, analysis_id, waiting)
        rows = db.session.scalars(select(Explanation).where(
            Explanation.analysis_id == analysis_id, Explanation.method == "shap").order_by(Explanation.id)).all()
        claimed = _claim(rows)
        if not claimed:
            db.session.remove()
            return "nothing to do"
        ids = [r.id for r in claimed]
        try:
            return _run_guarded(ids, lambda: _compute_shap(analysis, claimed, task=self))
        except batching.PredictionsWaiting:  # uploads arrived mid-computation: give the CPU back
            return batching.requeue_explanations(self, analysis_id, ids)


def _compute_shap(analysis, rows, task=None) -> None:
    import numpy as np

    from ml.explain.gradcam import predictor_temperature
    from ml.explain.shap_explainer import default_blur, probability_function, resize_values, shap_values
    from webapp.db import db

    model = _model_for(rows[0])
    settings = core.settings
    t0 = time.perf_counter()
    pixels = core._read_rgb(analysis.image.storage_key)
    indices = [model.class_names.index(r.class_name) for r in rows]
    max_evals, batch_size = int(settings.SHAP_MAX_EVALS), int(settings.SHAP_BATCH_SIZE)
    blur = default_blur(*model.input_size)
    t1 = time.perf_counter()
    fn = probability_function(model.model, predictor_temperature(model))
    if task is not None:
        from .batching import yielding

        fn = yielding(fn, task)  # stops between model batches when predictions are waiting
    result = shap_values(fn, model.preprocess(pixels), max_evals=max_evals, batch_size=batch_size,
                         class_indices=indices, blur=blur)
    t2 = time.perf_counter()
    maps = [resize_values(v, pixels.shape[:2]) for v in result.values]
    vmax = max(float(np.max(np.abs(m))) for m in maps) or 1.0  # one scale for every class of the image
    for row, values, base in zip(rows, maps, result.base_values):
        index = model.class_names.index(row.class_name)
        store_explanation(row, analysis.image, values, shap_layer_png(values, vmax), {
            "max_evals": max_evals, "batch_size": batch_size, "blur": blur, "vmax": vmax,
            "base_value": float(base), "probability": float(result.probs[index]),
            "sum": float(np.sum(values)), "units": "probability, summed over colour channels",
        })
        row.timings = {"load_image_ms": round((t1 - t0) * 1000, 1), "shap_ms": round((t2 - t1) * 1000, 1),
                       "store_ms": round((time.perf_counter() - t2) * 1000, 1)}
    db.session.commit()


@core.app.task(name=GRADCAM_TASK, bind=True)
def gradcam(self, explanation_id: int) -> str:
    """A requested Grad-CAM or Grad-CAM++ map for the row's class."""
    from webapp.db import db
    from webapp.models import Explanation

    with core.flask_app().app_context():
        row = db.session.get(Explanation, explanation_id)
        if row is None:
            return "missing"
        if row.method not in ("gradcam", "gradcam++"):
            fail_rows([row.id], f"worker.tasks.explain_gradcam cannot compute {row.method!r} explanations.")
            return "failed"
        claimed = _claim([row])
        if not claimed:
            status = row.status
            db.session.remove()
            return status
        return _run_guarded([row.id], lambda: _compute_gradcam(row))


def _compute_gradcam(row) -> None:
    from ml.explain import explain_gradcam
    from webapp.db import db

    model = _model_for(row)
    t0 = time.perf_counter()
    pixels = core._read_rgb(row.image.storage_key)
    t1 = time.perf_counter()
    result = explain_gradcam(model, [pixels], row.class_name, plus_plus=row.method == "gradcam++")
    t2 = time.perf_counter()
    heatmap = result.maps[0]
    store_explanation(row, row.image, heatmap, gradcam_layer_png(heatmap),
                      {"in_prediction_pass": False, "cmap": "jet", "range": [0.0, 1.0],
                       "probability": float(result.probs[0][int(result.class_indices[0])])})
    row.timings = {"load_image_ms": round((t1 - t0) * 1000, 1), "gradcam_ms": round((t2 - t1) * 1000, 1),
                   "store_ms": round((time.perf_counter() - t2) * 1000, 1)}
    db.session.commit()


def sweep_explanations(app, now=None, send_fn=None, queued_after: float | None = None,
                       running_margin: float = 60.0) -> dict[str, int]:
    """One pass for the periodic sweep (worker/sweep.py may call it): no explanation stays pending.

    - `running` longer than TASK_TIME_LIMIT + running_margin: its worker died without the
      task_failure backstop (killed with its main process) -> `failed` with the reason.
    - `queued` longer than `queued_after` (default SWEEP_QUEUED_AFTER, else 300 s): its message may
      be lost (broker down when it was sent) -> sent again, at most once per 10 x queued_after
      (`params.resent_at`); a duplicate message is harmless (rows are claimed).

    Returns:
        Counts: failed, resent.
    """
    from datetime import datetime

    from webapp.db import db
    from webapp.models import Explanation, utcnow

    settings = app.extensions["settings"]
    now = now or utcnow()
    send_fn = send_fn or send
    queued_after = float(queued_after or getattr(settings, "SWEEP_QUEUED_AFTER", 300))
    counts = {"failed": 0, "resent": 0}
    with app.app_context():
        try:
            stale = now - timedelta(seconds=float(settings.TASK_TIME_LIMIT) + running_margin)
            for row in db.session.scalars(select(Explanation).where(
                    Explanation.status == "running", Explanation.started_at < stale)).all():
                row.status, row.finished_at = "failed", now
                row.error = (f"Stopped without finishing within {settings.TASK_TIME_LIMIT} s (its worker stopped); "
                             "request it again.")
                counts["failed"] += 1
            db.session.commit()
            old = now - timedelta(seconds=queued_after)
            shap_analyses: set[int] = set()
            for row in db.session.scalars(select(Explanation).where(
                    Explanation.status == "queued", Explanation.created_at < old)).all():
                resent = (row.params or {}).get("resent_at")
                if resent and now - datetime.fromisoformat(resent) < timedelta(seconds=10 * queued_after):
                    continue
                row.params = {**(row.params or {}), "resent_at": now.isoformat()}
                if row.method == "shap":
                    shap_analyses.add(row.analysis_id)
                else:
                    send_fn(GRADCAM_TASK, row.id)
                counts["resent"] += 1
            db.session.commit()
            for analysis_id in sorted(shap_analyses):
                send_fn(SHAP_TASK, analysis_id)
        finally:
            db.session.remove()
    return counts


@task_failure.connect
def _mark_failed(sender=None, exception=None, args=None, **_: Any) -> None:
    """Backstop for failures outside the task body (e.g. the hard time limit killed the process)."""
    name = getattr(sender, "name", None)
    if name not in (SHAP_TASK, GRADCAM_TASK) or not args:
        return
    try:
        from webapp.db import db
        from webapp.models import Explanation

        if isinstance(exception, TimeLimitExceeded):
            message = f"TimeLimitExceeded: stopped by the hard time limit of {core.settings.TASK_TIME_LIMIT} s."
        else:
            message = f"{exception.__class__.__name__}: {exception}"
        with core.flask_app().app_context():
            if name == SHAP_TASK:
                ids = db.session.scalars(select(Explanation.id).where(
                    Explanation.analysis_id == int(args[0]), Explanation.method == "shap",
                    Explanation.status == "running")).all()
            else:
                ids = [int(args[0])]
            fail_rows(ids, message)
            db.session.remove()
    except Exception:
        log.exception("Could not mark explanation(s) %s failed.", args)
