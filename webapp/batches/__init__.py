"""Folder uploads: archives and chunks (service), their metadata CSV (metadata), progress pages (routes), server-side import (cli)."""
