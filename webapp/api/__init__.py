"""The JSON API (/api/v1): one blueprint (blueprint) with its routes by capability, thin over the same services, and its OpenAPI document (spectree, from the schemas in schemas.py)."""

from . import batches, cases, model_versions, reviews, status  # noqa: F401  (each adds its routes to the blueprint)
from .blueprint import bp

__all__ = ["bp"]
