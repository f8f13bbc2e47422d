"""Analyses record whether the case's metadata (age, sex, site) went into the answer, beside the image.

Revision ID: 0006_analysis_metadata_used
Revises: 0005_session_generation
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_analysis_metadata_used"
down_revision = "0005_session_generation"
branch_labels = None
depends_on = None


def upgrade():
    # Earlier analyses were the network's answer on the image alone: false, not unknown.
    with op.batch_alter_table("analyses", schema=None) as batch_op:
        batch_op.add_column(sa.Column("metadata_used", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade():
    with op.batch_alter_table("analyses", schema=None) as batch_op:
        batch_op.drop_column("metadata_used")
