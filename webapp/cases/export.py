"""The case history as CSV: every matching case, streamed, each cell neutralised against spreadsheet formulas."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from typing import Any

from flask import Response, stream_with_context

from ..config import DISCLAIMER
from ..models import DX_CLASSES, User
from ..review import blind
from ..security import neutralise
from .listing import CaseFilters, fetch_page, parse_filters

EXPORT_COLUMNS = (
    "case_id",
    "created",
    "uploader",
    "batch_id",
    "filename",
    "patient_ref",
    "lesion_ref",
    "age",
    "sex",
    "site",
    "reference_dx",
    "reference_dx_type",
    "status",
    "model_name",
    "model_version",
    "model_trained",
    "model_trained_on",
    "predicted_class",
    "out_of_distribution",
    "top_class_rule",
    "model_inputs",
    "predicted_probability",
    "malignant_probability",
    "other_predictions",
    "review_count",
    "review_consensus",
    "reviews_agree",
    "reviews_disagree",
    "reviews",
    # One column per class, so a spreadsheet can sort or threshold on any of them; then the notice
    # on every row, which survives filtering and copying rows elsewhere.
    *(f"probability_{c}" for c in DX_CLASSES),
    "notice",
)


def export_rows(f: CaseFilters, user: User | None, chunk: int = 500) -> Iterator[dict[str, Any]]:
    """Every matching case (not one page), in id order, `chunk` cases per query round."""
    f = CaseFilters(**{**asdict(f), "sort": "oldest", "cursor": "", "per_page": chunk})
    while True:
        page = fetch_page(f, user, with_reviews=True, count=False)
        yield from page.rows
        if not page.next_cursor:
            return
        f = CaseFilters(**{**asdict(f), "cursor": page.next_cursor})


def _rounded(value: float | None) -> float | None:
    return round(value, 6) if value is not None else None


def _export_record(row: dict[str, Any]) -> list[Any]:
    p = row["prediction"] or {}
    model = p.get("model") or {}
    others = [q for q in row["predictions"] if q is not row["prediction"]]
    reviews = row.get("reviews") or []
    values = {
        "case_id": row["id"],
        "created": row["created"],
        "uploader": row["uploader"],
        "batch_id": row["batch_id"],
        "filename": row["filename"],
        "patient_ref": row["patient_ref"],
        "lesion_ref": row["lesion_ref"],
        "age": row["age"],
        "sex": row["sex"],
        "site": row["site"],
        "reference_dx": row["reference_dx"],
        "reference_dx_type": row["reference_dx_type"],
        "status": row["status"],
        "model_name": model.get("name"),
        "model_version": model.get("version"),
        "model_trained": model.get("trained"),
        "model_trained_on": model.get("trained_on"),
        "top_class_rule": model.get("top_class_rule"),
        "model_inputs": model.get("inputs"),
        "predicted_class": p.get("top_class"),
        # "flagged": the image did not look like dermoscopy (ml.ood), so the predicted class is unreliable.
        "out_of_distribution": {True: "flagged", False: "no"}.get(
            (p.get("out_of_distribution") or {}).get("flagged"), ""
        ),
        "predicted_probability": _rounded(p.get("probability")),
        "malignant_probability": p.get("malignant_probability"),
        "other_predictions": "; ".join(
            f"{q['model']['name']} {q['model']['version']}: {q['top_class']} ({q['probability']:.4f})" for q in others
        ),
        "review_count": row["review_summary"]["count"],
        "review_consensus": row["review_summary"]["consensus"],
        "reviews_agree": row["review_summary"]["agree"],
        "reviews_disagree": row["review_summary"]["disagree"],
        "reviews": " | ".join(
            f"{r['reviewer']}: {r['diagnosis']}, "
            f"{'agrees' if r['agrees_with_model'] else 'disagrees' if r['agrees_with_model'] is False else 'no opinion'}"
            f", confidence {r['confidence']}" + (f", notes: {r['notes']}" if r["notes"] else "")
            for r in reviews
        ),
        **{f"probability_{c}": _rounded((p.get("probabilities") or {}).get(c)) for c in DX_CLASSES},
        "notice": DISCLAIMER,
    }
    if row.get("blind_review"):
        values["predicted_class"] = blind.MARK
    return [neutralise("" if values[c] is None else values[c]) for c in EXPORT_COLUMNS]


def export_csv(f: CaseFilters, user: User | None) -> Iterator[str]:
    """The CSV text in pieces (for a streamed response); every cell neutralised against formulas."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_COLUMNS)
    for i, row in enumerate(export_rows(f, user)):
        writer.writerow(_export_record(row))
        if i % 200 == 199:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def csv_response(args: Mapping[str, str], user: User | None) -> Response:
    """A streamed CSV download of the cases that match the filters in `args`."""
    filters = parse_filters(args)
    response = Response(stream_with_context(export_csv(filters, user)), mimetype="text/csv")
    response.headers["Content-Disposition"] = 'attachment; filename="cases.csv"'
    response.headers["X-Disclaimer"] = "Research use only - not a diagnostic device."
    return response
