"""Folder uploads: chunks and archives stored as cases (service), the metadata CSV and zip checks (inputs), progress pages
(routes), server-side import (cli)."""
