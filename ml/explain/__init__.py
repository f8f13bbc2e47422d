"""Explanations of the classifier's predictions: CAM, Grad-CAM(++), SHAP, and drawing them.

Explainers are functions that take a model (or an `ml.Predictor`) and return float arrays;
drawing lives in `ml.explain.overlay`. `python -m ml.explain --help` writes overlays and raw maps
for a folder of images. SHAP is imported lazily (it pulls in numba), so importing this package
costs only TensorFlow, which `ml` needs anyway.
"""

from ml.explain.cam import cam_function, cam_head
from ml.explain.gradcam import (
    MAP_METHODS,
    GradCamExplanation,
    calibrate,
    explain_gradcam,
    gradcam_function,
    last_feature_layer,
    map_method,
    predict_with_gradcam,
)
from ml.explain.metrics import energy_inside, positive_mass_inside
from ml.explain.overlay import (
    encode_png,
    heatmap_with_colorbar,
    overlay_heatmap,
    overlay_signed,
    signed_with_colorbar,
)
from ml.explain.shap_explainer import ShapExplanation, explain_shap, probability_function, shap_values

__all__ = [
    "MAP_METHODS",
    "GradCamExplanation",
    "ShapExplanation",
    "calibrate",
    "cam_function",
    "cam_head",
    "encode_png",
    "energy_inside",
    "explain_gradcam",
    "explain_shap",
    "gradcam_function",
    "heatmap_with_colorbar",
    "last_feature_layer",
    "map_method",
    "overlay_heatmap",
    "overlay_signed",
    "positive_mass_inside",
    "predict_with_gradcam",
    "probability_function",
    "shap_values",
    "signed_with_colorbar",
]
