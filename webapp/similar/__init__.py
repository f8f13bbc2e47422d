"""Similar prior cases (a vector index over the embeddings analyses store) and the
out-of-distribution verdict of an analysis; see docs/similar.md."""
