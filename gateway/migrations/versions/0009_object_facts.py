"""object_facts: modification times and checksums of objects, kept by the gateway (drive/facts.py)

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

KEY = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "object_facts",
        sa.Column("key", KEY, primary_key=True),
        sa.Column("folder", KEY, nullable=False),
        sa.Column("etag", sa.String(200), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("mtime", sa.Float(), nullable=True),
        sa.Column("sha1", sa.String(40), nullable=True),
        sa.Column("md5", sa.String(32), nullable=True),
        sa.Column("pending_size", sa.BigInteger(), nullable=True),
        sa.Column("pending_mtime", sa.Float(), nullable=True),
        sa.Column("pending_since", sa.Float(), nullable=True),
        sa.Column("pending_until", sa.Float(), nullable=True),
    )
    op.create_index("ix_object_facts_folder", "object_facts", ["folder"])


def downgrade() -> None:
    op.drop_table("object_facts")
