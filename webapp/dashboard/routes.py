"""The dashboard page: the model against the reference diagnosis, and reviewer agreement."""

from __future__ import annotations

from flask import Blueprint, render_template, request
from flask_login import login_required

from ..models import DX_LONG_NAMES
from ..security import query_id
from .figures import dashboard as dashboard_data

bp = Blueprint("dashboard", __name__)


@bp.get("/dashboard")
@login_required
def dashboard():
    model_version = request.args.get("model_version", type=query_id)
    return render_template("dashboard.html", data=dashboard_data(model_version), dx_names=DX_LONG_NAMES)
