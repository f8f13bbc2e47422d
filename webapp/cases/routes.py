"""Case pages: the case history, the upload form, the case page and its JSON status for polling, CSV export."""

from __future__ import annotations

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    send_file,
    url_for,
)
from flask_login import login_required
from sqlalchemy import select
from werkzeug.exceptions import RequestEntityTooLarge

from ..audit import entry_dict
from ..auth.sessions import role_required, viewer_or_refusal
from ..config import DISCLAIMER
from ..db import db
from ..errors import error_response, get_or_404, wants_json
from ..models import DX_CLASSES, SEXES, SITES, AuditEntry, Batch, Case, ModelVersion, Review, User
from ..presenters import case_dict
from ..review import blind
from ..review.service import can_review
from ..security import upload_limit
from ..similar.service import add_similar_cases
from ..states import JobStatus
from ..storage import IMAGES, StorageError, content_type, storage_from_settings
from .deletion import DeletionError, check_confirmed, delete_case
from .export import csv_response
from .intake import DuplicateImage, FieldError, UploadError, create_case, parse_case_fields
from .listing import FilterError, fetch_page, page_json, parse_filters

bp = Blueprint("cases", __name__)


@bp.get("/")
@login_required
def home():
    return redirect(url_for("cases.index"))


@bp.get("/cases")
@login_required
def index():
    """The case history: filters, sorting and cursor pagination (cases.listing)."""
    try:
        filters = parse_filters(request.args)
        page = fetch_page(filters, g.user)
        status = 200
    except FilterError as exc:
        flash(exc.message, "error")
        filters = parse_filters({})
        page, status = fetch_page(filters, g.user), 400
    choices = {
        "model_versions": db.session.scalars(select(ModelVersion).order_by(ModelVersion.id)).all(),
        "uploaders": db.session.execute(select(User.id, User.email).order_by(User.email)).all(),
        "batches": db.session.execute(select(Batch.id, Batch.name).order_by(Batch.id.desc()).limit(200)).all(),
        "classes": DX_CLASSES,
        "sexes": SEXES,
        "sites": SITES,
    }
    start = request.args.get("start", 1, type=int)
    return render_template(
        "cases/index.html",
        page=page,
        f=filters,
        choices=choices,
        start=max(start, 1),
        blinded=blind.applies_to(g.user),
    ), status


@bp.route("/cases/new", methods=("GET", "POST"))
@login_required
@upload_limit
def new():
    if not g.user.can_upload:
        abort(403, description=f"Role {g.user.role!r} may not upload cases.")
    form = request.form if request.method == "POST" else {}
    if request.method == "POST":
        file = request.files.get("image")
        try:
            if file is None or not file.filename:
                raise UploadError("Choose a JPEG or PNG image to upload.")
            case, _ = create_case(file.read(), file.filename, parse_case_fields(request.form), g.user)
        except (FieldError, UploadError) as exc:
            flash(exc.message, "error")
            return _upload_form(form), getattr(exc, "status", 400)
        except DuplicateImage as exc:
            flash(exc.message, "info")
            return redirect(url_for("cases.show", case_id=exc.case_id))
        return redirect(url_for("cases.show", case_id=case.id))
    return _upload_form(form)


def _upload_form(form) -> str:
    return render_template("cases/new.html", form=form, sexes=SEXES, sites=SITES, classes=DX_CLASSES)


@bp.errorhandler(RequestEntityTooLarge)
def upload_too_large(exc: RequestEntityTooLarge):
    """A body over MAX_CONTENT_LENGTH is refused before the view runs: the upload form says so,
    with the limit, instead of the server's bare 413 page."""
    if request.endpoint != "cases.new" or wants_json():
        return error_response(exc)
    limit_mb = current_app.config["MAX_UPLOAD_MB"]
    flash(
        f"The file is larger than the upload limit of {limit_mb:g} MB; nothing was stored. Choose a smaller image.",
        "error",
    )
    return _upload_form({}), 413


@bp.get("/cases/<int:case_id>")
@login_required
def show(case_id: int):
    case = get_or_404(Case, case_id)
    return render_template("cases/show.html", case=case, data=_case_data(case), research=_research_context(case))


def _case_data(case: Case) -> dict:
    """The case as the signed-in user may see it (blind review: webapp.review.blind)."""
    data = case_dict(case)
    add_similar_cases(data["analyses"], g.user)
    return blind.hide_from(g.user, data)


@bp.post("/cases/<int:case_id>/delete")
@role_required("admin")
def delete(case_id: int):
    """The case page's delete form: an admin's confirmed request with a reason (cases.deletion)."""
    try:
        check_confirmed(request.form)
        result = delete_case(case_id, g.user, request.form.get("reason"))
    except DeletionError as exc:
        flash(exc.message, "error")
        return show(case_id), exc.status
    flash(f"Case #{case_id} was deleted ({result.files_removed} stored file(s) removed).", "info")
    return redirect(url_for("cases.index"))


def _research_context(case: Case) -> dict:
    """What the case page shows of the research portal: reviews, their history, re-run choices."""
    blinded = blind.is_blinded(g.user, case.id)
    if blinded:  # the other reviews and their history say whether each agreed with the model
        reviews, history = [], []
    else:
        reviews = db.session.scalars(select(Review).where(Review.case_id == case.id).order_by(Review.id)).all()
        history = db.session.scalars(
            select(AuditEntry).where(AuditEntry.case_id == case.id).order_by(AuditEntry.id.desc()).limit(200)
        ).all()
    return {
        "blinded": blinded,
        "reviews": reviews,
        "history": [entry_dict(e) for e in history],
        "model_versions": db.session.scalars(select(ModelVersion).order_by(ModelVersion.id)).all(),
        "can_review": can_review(g.user),
        "batch": db.session.get(Batch, case.batch_id) if case.batch_id else None,
    }


@bp.get("/cases/<int:case_id>/status.json")
@login_required
def status(case_id: int):
    """Polled by static/case.js: the case as the API gives it, plus the rendered results block."""
    data = _case_data(get_or_404(Case, case_id))
    data["html"] = render_template("cases/_results.html", data=data)
    data["explanations_html"] = render_template("cases/_explanations.html", data=data)
    data["done"] = JobStatus(data["status"]).finished and not data["explanations_pending"]
    return jsonify(data)


@bp.get("/files/<path:key>")
def stored_file(key: str):
    """A stored image, for a signed-in page or an API token (the `url` of the API's image entries).

    Images only: explanation maps have their own routes, which check blind review
    (webapp.cases.explanation_routes), and a batch's uploaded archive is the worker's alone."""
    user, refusal = viewer_or_refusal()
    if user is None:
        return refusal
    if not key.startswith(IMAGES):
        abort(404)
    storage = storage_from_settings(current_app.extensions["settings"])
    try:
        handle = storage.open(key)
    except StorageError:
        abort(404)
    return send_file(handle, mimetype=content_type(key))


@bp.get("/cases/export.json")
@login_required
def export_cases_json():
    """The case list's JSON export for a signed-in browser: the API's body, one page per request."""
    try:
        filters = parse_filters(request.args)
        page = fetch_page(filters, g.user, with_reviews=True)
    except FilterError as exc:
        return jsonify({"error": exc.message, "field": exc.field, "status": 400}), 400
    next_url = (
        url_for("cases.export_cases_json", **filters.query_args(cursor=page.next_cursor)) if page.next_cursor else None
    )
    return jsonify(page_json(page, next_url, DISCLAIMER))


@bp.get("/cases/export.csv")
@login_required
def export_cases_csv():
    try:
        return csv_response(request.args, g.user)
    except FilterError as exc:
        abort(400, description=exc.message)
