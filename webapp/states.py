"""The states of jobs, analyses and explanations, and the kinds of work: defined once, used by the
ORM (its CHECK constraints), the pages, the API and the worker.

They are `StrEnum`s: a member equals its string, so rows store and compare plain text.
"""

from __future__ import annotations

from enum import StrEnum


class JobKind(StrEnum):
    ANALYSE = "analyse"
    EXPLAIN = "explain"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED)


class AnalysisStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class ExplanationMethod(StrEnum):
    GRADCAM = "gradcam"
    GRADCAM_PLUS_PLUS = "gradcam++"  # storage keys spell it "gradcampp" ("+" is not allowed there)
    SHAP = "shap"


class ExplanationStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"

    @property
    def pending(self) -> bool:
        return self in (ExplanationStatus.QUEUED, ExplanationStatus.RUNNING)
