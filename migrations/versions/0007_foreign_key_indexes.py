"""Indexes on the foreign keys that ON DELETE SET NULL follows (jobs.analysis_id, batch_items.image_id,
batch_items.job_id, reviews.analysis_id): deleting a case or batch on request (webapp/cases/deletion.py)
otherwise scans those tables once per deleted row.

Revision ID: 0007_foreign_key_indexes
Revises: 0006_analysis_metadata_used
"""

from alembic import op

revision = "0007_foreign_key_indexes"
down_revision = "0006_analysis_metadata_used"
branch_labels = None
depends_on = None

INDEXES = [
    ("ix_jobs_analysis_id", "jobs", "analysis_id"),
    ("ix_batch_items_image_id", "batch_items", "image_id"),
    ("ix_batch_items_job_id", "batch_items", "job_id"),
    ("ix_reviews_analysis_id", "reviews", "analysis_id"),
]


def upgrade():
    # CREATE INDEX needs no table rebuild, on SQLite either.
    for name, table, column in INDEXES:
        op.create_index(name, table, [column], unique=False)


def downgrade():
    for name, table, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
