"""Batch items of a zip archive wait as `pending` until a worker decodes them (`batch_items.pending`):
the web request stores the archive and one pending item per image entry, and the ingest task turns
each into a case, a duplicate link or a per-file error. Rows stored before are not pending.

Revision ID: 0010_batch_item_pending
Revises: 0009_analysis_embedding
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_batch_item_pending"
down_revision = "0009_analysis_embedding"
branch_labels = None
depends_on = None


def upgrade():
    # ADD COLUMN with a constant default needs no table rebuild, on SQLite either.
    op.add_column("batch_items", sa.Column("pending", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade():
    with op.batch_alter_table("batch_items", schema=None) as batch_op:
        batch_op.drop_column("pending")
