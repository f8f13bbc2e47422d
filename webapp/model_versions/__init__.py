"""Model versions: registration and re-runs with another version (service), their pages (routes) and CLI (cli)."""
