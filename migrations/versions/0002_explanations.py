"""Explanations (Grad-CAM, SHAP) per image, model version, method and class.

Revision ID: 0002_explanations
Revises: 0001_initial
"""
from alembic import op
import sqlalchemy as sa

revision = '0002_explanations'
down_revision = '0001_initial'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('explanations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('analysis_id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('model_version_id', sa.Integer(), nullable=False),
    sa.Column('method', sa.String(length=20), nullable=False),
    sa.Column('class_name', sa.String(length=20), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('raw_key', sa.String(length=255), nullable=True),
    sa.Column('overlay_key', sa.String(length=255), nullable=True),
    sa.Column('params', sa.JSON(), nullable=True),
    sa.Column('timings', sa.JSON(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("method IN ('gradcam', 'gradcam++', 'shap')", name=op.f('ck_explanations_method')),
    sa.CheckConstraint("status IN ('queued', 'running', 'done', 'failed')", name=op.f('ck_explanations_status')),
    sa.ForeignKeyConstraint(['analysis_id'], ['analyses.id'], name=op.f('fk_explanations_analysis_id_analyses'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_explanations_image_id_images'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_explanations_model_version_id_model_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_explanations')),
    sa.UniqueConstraint('image_id', 'model_version_id', 'method', 'class_name', name=op.f('uq_explanations_image_id_model_version_id_method_class_name'))
    )
    with op.batch_alter_table('explanations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_explanations_analysis_id'), ['analysis_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_explanations_image_id'), ['image_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_explanations_model_version_id'), ['model_version_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_explanations_status'), ['status'], unique=False)


def downgrade():
    with op.batch_alter_table('explanations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_explanations_status'))
        batch_op.drop_index(batch_op.f('ix_explanations_model_version_id'))
        batch_op.drop_index(batch_op.f('ix_explanations_image_id'))
        batch_op.drop_index(batch_op.f('ix_explanations_analysis_id'))

    op.drop_table('explanations')
