# One image for the web and the worker (docker-compose.yml picks the command).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# The pinned lock first, so that code changes do not reinstall TensorFlow.
COPY requirements.lock pyproject.toml ./
RUN pip install -r requirements.lock

COPY . .
RUN pip install --no-deps --no-build-isolation -e . \
    && useradd --create-home --uid 1000 portal \
    && mkdir -p /data/storage /data/instance && chown -R portal /data
USER portal

ENV PORTAL_ENV=production INSTANCE_DIR=/data/instance STORAGE_DIR=/data/storage MODEL_DIR=/app/models/default
EXPOSE 8000
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "--workers", "2", "--threads", "4", "--timeout", "120", "webapp:create_app()"]
