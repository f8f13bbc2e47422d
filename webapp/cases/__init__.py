"""Cases: upload (intake), the case page and history (routes, listing), explanation maps (explanations,
explanation_routes), export."""
