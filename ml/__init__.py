"""Pure ML for the dermoscopy portal: model, data, training, evaluation, calibration, predictor.

`from ml import Predictor` is the entry point for the worker. The import is lazy so that
`import ml` does not pay for TensorFlow until a model is actually needed. This package imports neither Flask, SQLAlchemy nor Celery.
"""

__all__ = ["Predictor"]


def __getattr__(name):
    if name == "Predictor":
        from ml.predictor import Predictor  # lazy: `import ml` must not load TensorFlow (test_boundaries_ml)

        return Predictor
    raise AttributeError(f"module 'ml' has no attribute {name!r}")
