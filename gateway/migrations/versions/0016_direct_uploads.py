"""direct uploads of the client (issue 23, item 5): a presigned PUT's declared MD5, and the
multipart uploads the gateway starts for a client (their upload id and plan ride on their
quota hold)

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("object_facts", sa.Column("pending_md5", sa.String(32), nullable=True))
    op.add_column("quota_holds", sa.Column("upload_id", sa.String(1024), nullable=True))
    op.add_column("quota_holds", sa.Column("size", sa.BigInteger(), nullable=True))
    op.add_column("quota_holds", sa.Column("part_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("quota_holds", "part_bytes")
    op.drop_column("quota_holds", "size")
    op.drop_column("quota_holds", "upload_id")
    op.drop_column("object_facts", "pending_md5")
