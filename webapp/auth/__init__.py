"""Signing in and out, with the failed-login limit (routes); the session user, role checks and bearer tokens (sessions)."""
