"""The vector index over stored embeddings: faiss, one index per model version, a cache of the database.

The database is the source of truth (`analyses.embedding`); an index is built from it, kept in the
process, and brought up to date before each search with the analyses that finished since it last
looked (an indexed query on (model_version_id, finished_at)). `flask similar rebuild-index` writes
it to the instance folder so that a new process starts from the file instead of reading every row;
rows deleted since are dropped when a search looks their cases up.

Exact inner-product search (IndexFlatIP) below IVF_MIN vectors; above, an inverted file (IVF, exact
distances within the NPROBE nearest of its lists), which keeps a search at 100,000 vectors at a
fraction of the cost of scanning them all (docs/similar.md has the figures).
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from ..db import db
from ..models import Analysis
from ..states import AnalysisStatus

IVF_MIN = 20_000
NPROBE = 16  # of about sqrt(n) lists: some 5 % of the vectors at 100,000
TRAIN_PER_LIST = 40
# An analysis commits within seconds of its finished_at; looking this far back catches one that
# committed after a later-finishing one was already indexed.
CATCH_UP = timedelta(seconds=60)
READ_CHUNK = 5_000


def _faiss():
    """faiss, imported on first use: it takes a second, and create_app must stay light."""
    import faiss

    faiss.omp_set_num_threads(1)  # one search per request: threads only contend with the web server
    return faiss


def vectors_from_blobs(blobs: list[bytes]) -> np.ndarray:
    """Stored float16 embeddings -> (N, d) float32 rows."""
    return np.frombuffer(b"".join(blobs), dtype="<f2").reshape(len(blobs), -1).astype(np.float32)


@dataclass
class VectorIndex:
    """The index of one model version's embeddings, keyed by analysis id."""

    dims: int
    index: Any  # a faiss.Index
    ids: set[int] = field(default_factory=set)
    seen_until: datetime | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray, dims: int) -> VectorIndex:
        faiss = _faiss()
        if len(ids) >= IVF_MIN:
            lists = int(math.sqrt(len(ids)))
            inner = faiss.IndexIVFFlat(faiss.IndexFlatIP(dims), dims, lists, faiss.METRIC_INNER_PRODUCT)
            sample = np.random.default_rng(0).permutation(len(vectors))[: TRAIN_PER_LIST * lists]
            inner.train(vectors[sample])  # k-means on a sample: as good, and seconds instead of a minute
            inner.nprobe = NPROBE
            index = inner
        else:
            index = faiss.IndexIDMap(faiss.IndexFlatIP(dims))
        if len(ids):
            index.add_with_ids(vectors, ids.astype(np.int64))
        return cls(dims, index, set(int(i) for i in ids))

    def add(self, ids: list[int], vectors: np.ndarray) -> None:
        new = [i for i, analysis_id in enumerate(ids) if analysis_id not in self.ids]
        if new:
            self.index.add_with_ids(vectors[new], np.asarray([ids[i] for i in new], np.int64))
            self.ids.update(ids[i] for i in new)

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(analysis id, cosine similarity) of the k nearest, nearest first."""
        if not self.ids:
            return []
        sims, ids = self.index.search(np.asarray(vector, np.float32).reshape(1, -1), min(k, len(self.ids)))
        return [(int(i), float(s)) for i, s in zip(ids[0], sims[0]) if i >= 0]


_indexes: dict[int, VectorIndex] = {}
_registry_lock = threading.Lock()


def _stored(model_version_id: int):
    return (
        Analysis.model_version_id == model_version_id,
        Analysis.status == AnalysisStatus.SUCCEEDED,
        Analysis.embedding.is_not(None),
    )


def _read(model_version_id: int, since: datetime | None, dims: int | None, known: set[int] = frozenset()):
    """(ids, vectors, dims, latest finished_at) of the stored embeddings finished since `since` (all
    when None), leaving out the `known` ids: the catch-up reads ids first (the index on
    (model_version_id, finished_at) covers them) and embeddings only for the new ones."""
    where = _stored(model_version_id)
    if since is not None:
        where += (Analysis.finished_at >= since - CATCH_UP,)
    found = db.session.execute(select(Analysis.id, Analysis.finished_at).where(*where)).all()
    latest = max([f for _, f in found if f is not None], default=since)
    wanted = [i for i, _ in found if i not in known]
    ids, blobs = [], []
    for start in range(0, len(wanted), READ_CHUNK):
        chunk = wanted[start : start + READ_CHUNK]
        for analysis_id, blob in db.session.execute(
            select(Analysis.id, Analysis.embedding).where(Analysis.id.in_(chunk))
        ):
            dims = dims or len(blob) // 2
            if len(blob) == 2 * dims:  # an artifact's projection fixes the size; skip anything else
                ids.append(analysis_id)
                blobs.append(blob)
    vectors = vectors_from_blobs(blobs) if blobs else np.zeros((0, dims or 0), np.float32)
    return np.asarray(ids, np.int64), vectors, dims, latest


def rebuild(model_version_id: int) -> VectorIndex | None:
    """A fresh index from the database (None when the version has no stored embedding)."""
    ids, vectors, dims, latest = _read(model_version_id, None, None)
    if dims is None:
        return None
    built = VectorIndex.build(ids, vectors, dims)
    built.seen_until = latest
    return built


def index_file(folder: Path, model_version_id: int) -> Path:
    return folder / f"model-version-{model_version_id}.faiss"


def save(built: VectorIndex, folder: Path, model_version_id: int) -> Path:
    """Writes the index and what it holds (ids, seen_until) beside it."""
    faiss = _faiss()
    folder.mkdir(parents=True, exist_ok=True)
    path = index_file(folder, model_version_id)
    faiss.write_index(built.index, str(path))
    state = {
        "dims": built.dims,
        "ids": sorted(built.ids),
        "seen_until": built.seen_until.isoformat() if built.seen_until else None,
    }
    path.with_suffix(".json").write_text(json.dumps(state))
    return path


def _load(folder: Path | None, model_version_id: int) -> VectorIndex | None:
    if folder is None or not index_file(folder, model_version_id).is_file():
        return None
    faiss = _faiss()
    path = index_file(folder, model_version_id)
    state = json.loads(path.with_suffix(".json").read_text())
    loaded = faiss.read_index(str(path))
    if isinstance(loaded, faiss.IndexIVF):
        loaded.nprobe = NPROBE
    seen = datetime.fromisoformat(state["seen_until"]) if state["seen_until"] else None
    return VectorIndex(int(state["dims"]), loaded, set(state["ids"]), seen)


def current(model_version_id: int, folder: Path | None = None) -> VectorIndex | None:
    """This process's index of the version, brought up to date with the database."""
    with _registry_lock:
        found = _indexes.get(model_version_id)
        if found is None:
            found = _load(folder, model_version_id) or rebuild(model_version_id)
            if found is None:
                return None
            _indexes[model_version_id] = found
    with found.lock:
        ids, vectors, _, latest = _read(model_version_id, found.seen_until, found.dims, found.ids)
        found.add([int(i) for i in ids], vectors)
        found.seen_until = latest
    return found


def forget() -> None:
    """Drops this process's indexes (after a rebuild, and between tests)."""
    with _registry_lock:
        _indexes.clear()
