"""drive usage: reserved bytes, and holds for presigned PUTs (quota as a reservation)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("drive_usage") as batch:
        batch.add_column(sa.Column("reserved_bytes", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("inflight", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("changes", sa.BigInteger(), nullable=False, server_default="0"))
    op.create_table(
        "quota_holds",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("prefix", sa.String(300), nullable=False),
        sa.Column("key", sa.String(1024), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("previous_etag", sa.String(100), nullable=True),
        sa.Column("previous_size", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_quota_holds_prefix", "quota_holds", ["prefix"])


def downgrade() -> None:
    op.drop_index("ix_quota_holds_prefix", table_name="quota_holds")
    op.drop_table("quota_holds")
    with op.batch_alter_table("drive_usage") as batch:
        batch.drop_column("changes")
        batch.drop_column("inflight")
        batch.drop_column("reserved_bytes")
