"""Reviews of prior cases: one current review per reviewer and case (service), the form and its queue (routes)."""
