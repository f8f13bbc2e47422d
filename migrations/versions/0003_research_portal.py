"""Research portal: batches and their items, reviews, the audit log, reference diagnoses, list indexes.

Revision ID: 0003_research_portal
Revises: 0002_explanations
"""
from alembic import op
import sqlalchemy as sa

revision = '0003_research_portal'
down_revision = '0002_explanations'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('batches',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=True),
    sa.Column('source', sa.String(length=20), nullable=False),
    sa.Column('created_by_id', sa.Integer(), nullable=True),
    sa.Column('expected_files', sa.Integer(), nullable=True),
    sa.Column('metadata_rows', sa.JSON(), nullable=True),
    sa.Column('metadata_filename', sa.String(length=255), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("source IN ('browser', 'api', 'zip', 'cli')", name=op.f('ck_batches_source')),
    sa.ForeignKeyConstraint(['created_by_id'], ['users.id'], name=op.f('fk_batches_created_by_id_users'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_batches'))
    )
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_batches_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_batches_created_by_id'), ['created_by_id'], unique=False)

    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reference_dx', sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column('reference_dx_type', sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column('batch_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_cases_batch_id_batches'), 'batches', ['batch_id'], ['id'], ondelete='SET NULL')
        batch_op.create_index(batch_op.f('ix_cases_batch_id'), ['batch_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_cases_reference_dx'), ['reference_dx'], unique=False)
        batch_op.create_index('ix_cases_age', ['age'], unique=False)
        batch_op.create_index('ix_cases_sex', ['sex'], unique=False)
        batch_op.create_index('ix_cases_site', ['site'], unique=False)
        batch_op.create_index('ix_cases_lesion_ref', ['lesion_ref'], unique=False)
        batch_op.create_index('ix_cases_patient_ref', ['patient_ref'], unique=False)

    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index('ix_images_original_filename', ['original_filename'], unique=False)

    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('artifact_path', sa.String(length=500), nullable=True))

    with op.batch_alter_table('analyses', schema=None) as batch_op:
        batch_op.create_index('ix_analyses_top_class_model_version_id', ['top_class', 'model_version_id', 'image_id'], unique=False)
        batch_op.create_index('ix_analyses_model_version_id_top_class', ['model_version_id', 'top_class', 'image_id'], unique=False)

    op.create_table('batch_items',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('batch_id', sa.Integer(), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=False),
    sa.Column('case_id', sa.Integer(), nullable=True),
    sa.Column('image_id', sa.Integer(), nullable=True),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('duplicate', sa.Boolean(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name=op.f('fk_batch_items_batch_id_batches'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['case_id'], ['cases.id'], name=op.f('fk_batch_items_case_id_cases'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_batch_items_image_id_images'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_batch_items_job_id_jobs'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_batch_items'))
    )
    with op.batch_alter_table('batch_items', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_batch_items_batch_id'), ['batch_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_batch_items_case_id'), ['case_id'], unique=False)

    op.create_table('reviews',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('case_id', sa.Integer(), nullable=False),
    sa.Column('reviewer_id', sa.Integer(), nullable=False),
    sa.Column('diagnosis', sa.String(length=20), nullable=False),
    sa.Column('agrees_with_model', sa.Boolean(), nullable=True),
    sa.Column('confidence', sa.Integer(), nullable=False),
    sa.Column('notes', sa.Text(), nullable=True),
    sa.Column('analysis_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("diagnosis IN ('akiec', 'bcc', 'bkl', 'df', 'mel', 'nv', 'vasc', 'other', 'uncertain')", name=op.f('ck_reviews_diagnosis')),
    sa.CheckConstraint('confidence >= 1 AND confidence <= 5', name=op.f('ck_reviews_confidence')),
    sa.ForeignKeyConstraint(['analysis_id'], ['analyses.id'], name=op.f('fk_reviews_analysis_id_analyses'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['case_id'], ['cases.id'], name=op.f('fk_reviews_case_id_cases'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['reviewer_id'], ['users.id'], name=op.f('fk_reviews_reviewer_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reviews')),
    sa.UniqueConstraint('case_id', 'reviewer_id', name=op.f('uq_reviews_case_id_reviewer_id'))
    )
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reviews_case_id'), ['case_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_reviews_reviewer_id'), ['reviewer_id'], unique=False)
        batch_op.create_index('ix_reviews_diagnosis', ['diagnosis'], unique=False)

    op.create_table('audit_log',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('action', sa.String(length=50), nullable=False),
    sa.Column('entity', sa.String(length=30), nullable=False),
    sa.Column('entity_id', sa.Integer(), nullable=True),
    sa.Column('case_id', sa.Integer(), nullable=True),
    sa.Column('old', sa.JSON(), nullable=True),
    sa.Column('new', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['case_id'], ['cases.id'], name=op.f('fk_audit_log_case_id_cases'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_audit_log_user_id_users'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log'))
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_log_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_log_case_id'), ['case_id'], unique=False)
        batch_op.create_index('ix_audit_log_entity', ['entity', 'entity_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_log_user_id'), ['user_id'], unique=False)


def downgrade():
    op.drop_table('audit_log')
    op.drop_table('reviews')
    op.drop_table('batch_items')
    with op.batch_alter_table('analyses', schema=None) as batch_op:
        batch_op.drop_index('ix_analyses_model_version_id_top_class')
        batch_op.drop_index('ix_analyses_top_class_model_version_id')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index('ix_images_original_filename')
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_column('artifact_path')
    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.drop_index('ix_cases_patient_ref')
        batch_op.drop_index('ix_cases_lesion_ref')
        batch_op.drop_index('ix_cases_site')
        batch_op.drop_index('ix_cases_sex')
        batch_op.drop_index('ix_cases_age')
        batch_op.drop_index(batch_op.f('ix_cases_reference_dx'))
        batch_op.drop_index(batch_op.f('ix_cases_batch_id'))
        batch_op.drop_constraint(batch_op.f('fk_cases_batch_id_batches'), type_='foreignkey')
        batch_op.drop_column('batch_id')
        batch_op.drop_column('reference_dx_type')
        batch_op.drop_column('reference_dx')
    op.drop_table('batches')
