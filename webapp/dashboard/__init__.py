"""Model-against-reference and reviewer-agreement figures (figures) and their page (routes)."""
