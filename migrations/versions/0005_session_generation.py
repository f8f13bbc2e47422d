"""Users carry a session generation: part of every signed-in session's id, raised to end them all
(logout, password change, role change, deactivation).

Revision ID: 0005_session_generation
Revises: 0004_job_claimed_by
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_session_generation"
down_revision = "0004_job_claimed_by"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("session_generation", sa.Integer(), server_default="0", nullable=False))


def downgrade():
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("session_generation")
