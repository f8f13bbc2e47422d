"""Model cards for the pages: the MODEL_CARD.md of a version's artifact folder, as safe HTML."""

from __future__ import annotations

import re
from pathlib import Path

from markdown_it import MarkdownIt
from markupsafe import Markup

from ..models import ModelVersion

CARD_FILE = "MODEL_CARD.md"
CARD_MAX_BYTES = 512 * 1024
# Absolute paths of the machine that wrote the card (its run folders, /tmp snapshots) say nothing to a
# reader and tell an outsider how the server is laid out.
SERVER_PATH = re.compile(r"(?<![\w.:/])/(?:tmp|home|root|work|srv|var|opt|usr|mnt|data)(?:/[^\s`)\]|]*)?")
# CommonMark with tables; raw HTML in the card is escaped (html=False), link targets are checked by
# markdown-it (no javascript: or data: URLs).
RENDERER = MarkdownIt("commonmark", {"html": False}).enable("table")
SCROLL_BOX = '<div class="table-scroll" tabindex="0" role="region" aria-label="A table of the model card">'


def card_markdown(mv: ModelVersion) -> str | None:
    """The card's text with server paths removed, or None when the version has no card on disk."""
    if not mv.artifact_path:
        return None
    path = Path(mv.artifact_path) / CARD_FILE
    try:
        raw = path.read_bytes()[:CARD_MAX_BYTES].decode("utf-8", errors="replace")
    except OSError:
        return None
    text = raw.replace(mv.artifact_path.rstrip("/"), "<artifact>")
    return SERVER_PATH.sub("<path>", text)


def card_html(mv: ModelVersion) -> Markup | None:
    text = card_markdown(mv)
    if text is None:
        return None
    # A card's tables are wider than a phone: each scrolls in its own box, reachable by keyboard.
    html = RENDERER.render(text).replace("<table>", SCROLL_BOX + "<table>").replace("</table>", "</table></div>")
    return Markup(html)
