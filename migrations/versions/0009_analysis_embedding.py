"""Analyses store the image's embedding (float16, ml.retrieval) and the out-of-distribution verdict
(`ood_score`, `ood_flagged`, ml.ood), written by the prediction pass; an index on
(model_version_id, finished_at) lets the similar-case index pick up what finished since it last
looked (webapp.similar). Analyses stored before have none: re-running them fills them.

Revision ID: 0009_analysis_embedding
Revises: 0008_image_source_hash
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_analysis_embedding"
down_revision = "0008_image_source_hash"
branch_labels = None
depends_on = None


def upgrade():
    # ADD COLUMN and CREATE INDEX need no table rebuild, on SQLite either; no model is loaded.
    op.add_column("analyses", sa.Column("embedding", sa.LargeBinary(), nullable=True))
    op.add_column("analyses", sa.Column("ood_score", sa.Float(), nullable=True))
    op.add_column("analyses", sa.Column("ood_flagged", sa.Boolean(), nullable=True))
    op.create_index("ix_analyses_model_version_finished", "analyses", ["model_version_id", "finished_at"])


def downgrade():
    op.drop_index("ix_analyses_model_version_finished", table_name="analyses")
    with op.batch_alter_table("analyses", schema=None) as batch_op:
        batch_op.drop_column("ood_flagged")
        batch_op.drop_column("ood_score")
        batch_op.drop_column("embedding")
