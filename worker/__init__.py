"""Celery worker: thin tasks that load rows by id, call ml/, and store the results."""
