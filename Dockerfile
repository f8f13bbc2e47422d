# The worker image: TensorFlow, the ml/ package, the Celery worker. docker-compose.yml builds it
# twice: `dermportal-worker:cpu` (tensorflow-cpu, as pinned in requirements.lock) and
# `dermportal-worker:gpu` (TF_PACKAGE="tensorflow[and-cuda]" at the same version, with CUDA wheels).
FROM python:3.11-slim

ARG TF_PACKAGE=""
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# The pinned lock first, so that code changes do not reinstall TensorFlow. For the GPU image
# scripts/gpu_requirements.py swaps the lock's tensorflow-cpu pin for "$TF_PACKAGE" at its version.
COPY requirements.lock pyproject.toml scripts/gpu_requirements.py ./
RUN if [ -n "$TF_PACKAGE" ]; then \
        python gpu_requirements.py requirements.lock --package "$TF_PACKAGE" > /tmp/requirements.txt; \
    else \
        cp requirements.lock /tmp/requirements.txt; \
    fi \
    && pip install -r /tmp/requirements.txt

COPY webapp/ webapp/
COPY worker/ worker/
COPY ml/ ml/
COPY migrations/ migrations/
COPY templates/ templates/
COPY static/ static/
RUN useradd --create-home --uid 1000 portal \
    && mkdir -p /data/storage /data/instance /models && chown -R portal /data
USER portal

ENV PYTHONPATH=/app PORTAL_ENV=production INSTANCE_DIR=/data/instance STORAGE_DIR=/data/storage MODEL_DIR=/models/default
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "predict,explain", "-c", "1", "--pool", "prefork", "-E", "-l", "INFO"]
