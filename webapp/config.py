"""One settings object for the web app and the worker: defaults, then environment, then overrides.

`Settings.load()` is the only place that reads configuration from the environment (flaskr and
microblog habits). The web app turns it into Flask config keys; the worker reads it directly.
Secrets have no default outside development: in development a random `SECRET_KEY` is generated
once into `instance/secret_key`; with `PORTAL_ENV=production` a missing `SECRET_KEY` is an error.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from limits import parse_many

REPO_ROOT = Path(__file__).resolve().parent.parent
ENVIRONMENTS = ("development", "production", "testing")
STORAGE_BACKENDS = ("local", "s3")
DISCLAIMER = "Research use only — not a diagnostic device."
# Random per process: a key written in the source once let a forged cookie reach /admin.
TESTING_SECRET_KEY = secrets.token_hex(32)


class ConfigError(RuntimeError):
    """A setting is missing or malformed; the message says which and how to fix it."""


def _parse_size(value: str) -> tuple[int, int]:
    try:
        h, w = (int(part) for part in value.replace("x", ",").split(","))
    except ValueError:
        raise ConfigError(f"UNTRAINED_INPUT_SIZE must look like 'H,W' (e.g. '120,160'), got {value!r}.") from None
    if h < 32 or w < 32:
        raise ConfigError(f"UNTRAINED_INPUT_SIZE must be at least 32,32 for EfficientNetB3, got {value!r}.")
    return h, w


def _parse_positive(name: str, value: str, kind=int):
    try:
        number = kind(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {value!r}.") from None
    if number <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}.")
    return number


def _parse_rate_limit(name: str, value: str) -> str:
    try:
        parse_many(value)
    except ValueError:
        raise ConfigError(
            f"{name} must look like '5 per 15 minutes' (several separated by ';'), got {value!r}."
        ) from None
    return value


def _parse_top_k(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"SHAP_TOP_K must be a whole number (0 turns SHAP off), got {value!r}.") from None
    if number < 0:
        raise ConfigError(f"SHAP_TOP_K must be 0 or more, got {value!r}.")
    return number


def _text(name: str, value: str) -> str:
    return value


def _stripped(name: str, value: str) -> str:
    return value.strip()


def _path(name: str, value: str) -> Path:
    return Path(value)


def _switch(name: str, value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _positive_int(name: str, value: str) -> int:
    return _parse_positive(name, value)


def _positive_float(name: str, value: str) -> float:
    return _parse_positive(name, value, float)


def _auto_or_positive_int(name: str, value: str) -> int:
    return 0 if value.strip() == "0" else _parse_positive(name, value)


def _off_or_positive_float(name: str, value: str) -> float:
    return 0.0 if value.strip() in ("0", "0.0") else _parse_positive(name, value, float)


# The settings read from the environment, each with its parser (name, raw text) -> value; the others
# are set through create_app(overrides) only. docs/configuration.md is generated from this table.
FROM_ENVIRONMENT: dict[str, Callable[[str, str], Any]] = {
    **dict.fromkeys(("PORTAL_ENV", "SECRET_KEY", "DATABASE_URL", "REDIS_URL"), _text),
    **dict.fromkeys(("INSTANCE_DIR", "STORAGE_DIR", "MODEL_DIR"), _path),
    **dict.fromkeys(("STORAGE_BACKEND", "S3_BUCKET", "S3_ENDPOINT_URL", "S3_REGION", "S3_PREFIX"), _stripped),
    **dict.fromkeys(("SESSION_HOURS", "MAX_UPLOAD_MB"), _positive_float),
    **dict.fromkeys(
        ("MAX_IMAGE_PIXELS", "TASK_SOFT_TIME_LIMIT", "TASK_TIME_LIMIT", "TASK_MAX_ATTEMPTS"), _positive_int
    ),
    **dict.fromkeys(("SWEEP_QUEUED_AFTER", "SWEEP_RUNNING_MARGIN", "HEALTH_CACHE_SECONDS"), _positive_float),
    **dict.fromkeys(("WORKER_PROCESSES", "PREDICT_THREADS"), _auto_or_positive_int),  # 0: auto
    "SWEEP_INTERVAL": _off_or_positive_float,  # 0 turns the sweep off
    **dict.fromkeys(("SHAP_MAX_EVALS", "SHAP_BATCH_SIZE", "PREDICT_BATCH_SIZE"), _positive_int),
    "SHAP_TOP_K": lambda name, value: _parse_top_k(value),
    **dict.fromkeys(("GRADCAM_PLUS_PLUS", "BLIND_REVIEW", "PREDICT_WARMUP"), _switch),
    **dict.fromkeys(
        ("LOGIN_RATE_LIMIT", "LOGIN_ADDRESS_RATE_LIMIT", "UPLOAD_RATE_LIMIT", "EXPLAIN_RATE_LIMIT"), _parse_rate_limit
    ),
    "UNTRAINED_INPUT_SIZE": lambda name, value: _parse_size(value),
}


@dataclass(frozen=True)
class Settings:
    """Everything the portal can be configured with. Field names match the environment variables."""

    PORTAL_ENV: str = "development"
    INSTANCE_DIR: Path = REPO_ROOT / "instance"
    SECRET_KEY: str | None = None
    DATABASE_URL: str | None = None  # default: sqlite file under INSTANCE_DIR
    REDIS_URL: str = "redis://127.0.0.1:6379/0"
    STORAGE_DIR: Path | None = None  # default: INSTANCE_DIR / "storage"
    # Where stored files live: "local" (the STORAGE_DIR folder, one machine) or "s3", an S3-compatible
    # bucket (AWS S3, MinIO, ...) that web and workers on separate machines share. Credentials come
    # from boto3's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, an instance role).
    STORAGE_BACKEND: str = "local"
    S3_BUCKET: str | None = None  # The bucket (it must exist); required with STORAGE_BACKEND=s3.
    S3_ENDPOINT_URL: str | None = None  # The service's URL, e.g. http://minio:9000; empty for AWS S3 itself.
    S3_REGION: str | None = None  # The bucket's region; empty: boto3's default (AWS_DEFAULT_REGION, ~/.aws/config).
    S3_PREFIX: str | None = None  # A folder in the bucket for the portal's objects, e.g. "dermportal".
    MODEL_DIR: Path = REPO_ROOT / "models" / "default"
    MAX_UPLOAD_MB: float = 20
    MAX_IMAGE_PIXELS: int = 40_000_000
    UNTRAINED_INPUT_SIZE: tuple[int, int] = (120, 160)
    # Seconds; soft raises inside the task (job -> failed), hard kills the worker child.
    TASK_SOFT_TIME_LIMIT: int = 300
    TASK_TIME_LIMIT: int = 360
    BROKER_TIMEOUT: float = 2.0  # publishing and health checks give up after this many seconds
    HEALTH_CACHE_SECONDS: float = (
        10  # /api/v1/health re-asks the broker and worker at most this often (in the background).
    )
    # Reliability (worker/sweep.py): every SWEEP_INTERVAL s (0: off) the worker re-sends jobs still
    # queued after SWEEP_QUEUED_AFTER s, and re-queues jobs `running` for longer than TASK_TIME_LIMIT +
    # SWEEP_RUNNING_MARGIN s (their worker died); a job fails after TASK_MAX_ATTEMPTS starts.
    SWEEP_INTERVAL: float = 30
    SWEEP_QUEUED_AFTER: float = 60
    SWEEP_RUNNING_MARGIN: float = 60
    TASK_MAX_ATTEMPTS: int = 3
    # Explanations: SHAP for the top-k classes after each prediction (explain queue), with this many
    # model evaluations per image in batches of SHAP_BATCH_SIZE; Grad-CAM++ instead of Grad-CAM in
    # the prediction pass when GRADCAM_PLUS_PLUS is set. SHAP_TOP_K=0 turns automatic SHAP off.
    SHAP_TOP_K: int = 2
    SHAP_MAX_EVALS: int = 500
    SHAP_BATCH_SIZE: int = 64
    GRADCAM_PLUS_PLUS: bool = False
    # Performance (worker/batching.py): analyse takes up to PREDICT_BATCH_SIZE queued jobs into one
    # forward pass; PREDICT_WARMUP runs the pass at every padded batch size when a pool process starts.
    PREDICT_BATCH_SIZE: int = 16
    PREDICT_WARMUP: bool = True
    # Worker pool processes (`make run`, `make bench`) and TensorFlow threads per process; 0 = auto:
    # one process per core (at most 4), the cores shared out between them (worker_layout below).
    WORKER_PROCESSES: int = 0
    PREDICT_THREADS: int = 0
    CSRF_ENABLED: bool = True
    # Blind review: a reviewer sees the model's answer to a case (on its page, in the case list, exports
    # and API) and the other reviews of it only after saving their own diagnosis, so the reviewers'
    # consensus is not anchored on the model it is compared with. Admins and researchers see everything.
    BLIND_REVIEW: bool = False
    SESSION_HOURS: float = 8  # A signed-in session ends this many hours after its last request (cookie and server).
    # Rate limits in Flask-Limiter's syntax ("5 per 15 minutes"; several separated by ";"), counted in Redis.
    LOGIN_RATE_LIMIT: str = "5 per 15 minutes"  # Failed logins per (email, client address), then 429.
    LOGIN_ADDRESS_RATE_LIMIT: str = "30 per 15 minutes"  # Failed logins per client address over all accounts, then 429.
    UPLOAD_RATE_LIMIT: str = "120 per minute"  # Uploads per user: single images and folder uploads, pages and API.
    EXPLAIN_RATE_LIMIT: str = "60 per hour"  # Explanation requests that queue a map, per user, pages and API.
    extra: dict[str, Any] = field(default_factory=dict)  # any other Flask config from overrides

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Builds the settings from defaults, then `environ` (default `os.environ`), then `overrides`.

        Raises:
            ConfigError: a value is malformed, or `SECRET_KEY` is missing in production.
        """
        environ = os.environ if environ is None else environ
        values = {name: parse(name, environ[name]) for name, parse in FROM_ENVIRONMENT.items() if environ.get(name)}

        known = {f.name for f in fields(cls)} - {"extra"}
        extra: dict[str, Any] = {}
        for key, value in (overrides or {}).items():
            if key in known:
                values[key] = Path(value) if key in ("INSTANCE_DIR", "STORAGE_DIR", "MODEL_DIR") and value else value
            elif key == "TESTING" and value:
                values.setdefault("PORTAL_ENV", "testing")
                extra[key] = value
            else:
                extra[key] = value
        settings = cls(**values, extra=extra)
        if settings.PORTAL_ENV == "testing" and not (extra.get("TESTING") or environ.get("PYTEST_CURRENT_TEST")):
            raise ConfigError(
                "PORTAL_ENV=testing is for the test suite only (create_app({'TESTING': True}) under pytest); "
                "serve the portal with PORTAL_ENV=development or production."
            )
        return settings._finish()

    def _finish(self) -> Settings:
        if self.PORTAL_ENV not in ENVIRONMENTS:
            raise ConfigError(f"PORTAL_ENV must be one of {ENVIRONMENTS}, got {self.PORTAL_ENV!r}.")
        instance = Path(self.INSTANCE_DIR)
        changes: dict[str, Any] = {"INSTANCE_DIR": instance}
        if not self.DATABASE_URL:
            changes["DATABASE_URL"] = f"sqlite:///{instance / 'portal.db'}"
        changes["STORAGE_DIR"] = Path(self.STORAGE_DIR) if self.STORAGE_DIR else instance / "storage"
        changes["MODEL_DIR"] = Path(self.MODEL_DIR)
        _check_storage(self)
        if self.TASK_TIME_LIMIT <= self.TASK_SOFT_TIME_LIMIT:
            raise ConfigError("TASK_TIME_LIMIT (hard) must be larger than TASK_SOFT_TIME_LIMIT (soft).")
        if not self.SECRET_KEY:
            if self.PORTAL_ENV == "production":
                raise ConfigError(
                    "SECRET_KEY is not set. In production set it to a long random string, e.g. "
                    "SECRET_KEY=$(python -c 'import secrets; print(secrets.token_hex(32))')."
                )
            if self.PORTAL_ENV == "testing":
                changes["SECRET_KEY"] = TESTING_SECRET_KEY
            else:
                changes["SECRET_KEY"] = development_secret_key(instance)
        return replace(self, **changes)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.MAX_UPLOAD_MB * 1024 * 1024)

    def flask_config(self) -> dict[str, Any]:
        """The Flask config keys derived from these settings (plus any extra overrides)."""
        config = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        config.update(
            SQLALCHEMY_DATABASE_URI=self.DATABASE_URL,
            SQLALCHEMY_ENGINE_OPTIONS=engine_options(self.DATABASE_URL),
            # The multipart envelope adds a little to the file itself; the exact limit on the
            # image bytes is checked in webapp.imaging.
            MAX_CONTENT_LENGTH=self.max_upload_bytes + 1024 * 1024,
            SESSION_COOKIE_HTTPONLY=True,
            SESSION_COOKIE_SAMESITE="Lax",
            SESSION_COOKIE_SECURE=self.PORTAL_ENV == "production",
            PERMANENT_SESSION_LIFETIME=timedelta(hours=self.SESSION_HOURS),
            REMEMBER_COOKIE_DURATION=timedelta(hours=self.SESSION_HOURS),  # no "remember me" today; never longer
        )
        config.update(self.extra)
        return config


def _check_storage(settings: Settings) -> None:
    if settings.STORAGE_BACKEND not in STORAGE_BACKENDS:
        raise ConfigError(f"STORAGE_BACKEND must be one of {STORAGE_BACKENDS}, got {settings.STORAGE_BACKEND!r}.")
    if settings.STORAGE_BACKEND == "s3" and not settings.S3_BUCKET:
        raise ConfigError("STORAGE_BACKEND=s3 needs S3_BUCKET, the name of an existing bucket.")


def usable_cpus() -> int:
    """Cores this process may run on (a container's cpuset, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def worker_layout(settings: Settings, pool_processes: int | None = None) -> tuple[int, int]:
    """(pool processes, TensorFlow threads per process) of a prediction worker.

    Why several single-threaded processes: EfficientNetB3's small depthwise convolutions scale badly
    over threads. On the 2-core development machine one process with 2 threads passes 71-78 images/s
    (batch 16, 120x160), two processes with 1 thread each 2 x 56 = 112 images/s, and while one process
    stores its results the other keeps the model busy. `pool_processes` is the worker's actual -c.
    """
    cpus = usable_cpus()
    processes = pool_processes or settings.WORKER_PROCESSES or min(cpus, 4)
    threads = settings.PREDICT_THREADS or max(1, cpus // processes)
    return processes, threads


def engine_options(database_url: str) -> dict[str, Any]:
    if database_url.startswith("sqlite"):
        # Waiting on a lock is done by the busy_timeout pragma (webapp.db); `timeout` is the same for
        # the sqlite3 module itself.
        return {"connect_args": {"timeout": 15}}
    return {"pool_pre_ping": True}


def development_secret_key(instance_dir: Path) -> str:
    """Reads `instance/secret_key`, creating it once with a random key (race-safe with O_EXCL)."""
    path = Path(instance_dir) / "secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    for _ in range(50):  # another process may be between create and write
        key = path.read_text().strip()
        if key:
            return key
        time.sleep(0.01)
    raise ConfigError(f"{path} is empty; delete it to have a new development key generated.")
