"""rentals: the in-pod mounts' status and what could not be flushed on return

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rentals") as batch:
        batch.add_column(sa.Column("mounts_json", sa.Text(), nullable=True))
        batch.add_column(sa.Column("flush_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rentals") as batch:
        batch.drop_column("flush_error")
        batch.drop_column("mounts_json")
