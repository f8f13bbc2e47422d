"""Signing in and out (routes), sessions, CSRF and role checks for pages, bearer tokens for the API (sessions)."""
