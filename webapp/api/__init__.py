"""The JSON API (/api/v1): one blueprint (blueprint) with its routes by capability, thin over the same services, and its OpenAPI document."""

from . import batches, cases, model_versions, reviews, status  # noqa: F401  (each adds its routes to the blueprint)
from .blueprint import bp

__all__ = ["bp"]
