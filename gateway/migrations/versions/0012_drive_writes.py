"""drive_writes: the files and folders being written now, so writes to one key are one at a time
on every replica and the quota counts each key once (gateway/quota.py; issue 19, item 11)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08
"""
import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

DAV_URL = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "drive_writes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("prefix", sa.String(300), nullable=False),
        sa.Column("path", DAV_URL, nullable=False),
        sa.Column("exclusive", sa.Boolean(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_drive_writes_prefix", "drive_writes", ["prefix"])


def downgrade() -> None:
    op.drop_table("drive_writes")
