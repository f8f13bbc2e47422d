"""Jobs remember which process claimed them (host:pid), so that a dead pool process's jobs are
re-queued at once (worker/sweep.py, requeue_orphans).

Revision ID: 0004_job_claimed_by
Revises: 0003_research_portal
"""
from alembic import op
import sqlalchemy as sa

revision = '0004_job_claimed_by'
down_revision = '0003_research_portal'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claimed_by', sa.String(length=255), nullable=True))


def downgrade():
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('claimed_by')
