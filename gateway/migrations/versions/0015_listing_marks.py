"""drive_changes and upload_urls: what keeps a cached folder listing current across replicas and
presigned PUTs (drive/store/caching.py; issue 21, step 2)

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

DAV_URL = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "drive_changes",
        sa.Column("prefix", sa.String(300), primary_key=True),
        sa.Column("generation", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.create_table(
        "upload_urls",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("prefix", sa.String(300), nullable=False),
        sa.Column("key", DAV_URL, nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_upload_urls_prefix_key", "upload_urls", ["prefix", "key"])


def downgrade() -> None:
    op.drop_table("upload_urls")
    op.drop_table("drive_changes")
