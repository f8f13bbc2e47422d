"""Images remember the SHA-256 of the bytes as uploaded (`images.source_hash`, indexed), so that the
same file uploaded again is refused before it is decoded. Rows stored before have none.

Revision ID: 0008_image_source_hash
Revises: 0007_foreign_key_indexes
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_image_source_hash"
down_revision = "0007_foreign_key_indexes"
branch_labels = None
depends_on = None


def upgrade():
    # ADD COLUMN and CREATE INDEX need no table rebuild, on SQLite either.
    op.add_column("images", sa.Column("source_hash", sa.String(length=64), nullable=True))
    op.create_index("ix_images_source_hash", "images", ["source_hash"], unique=False)


def downgrade():
    op.drop_index("ix_images_source_hash", table_name="images")
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("source_hash")
