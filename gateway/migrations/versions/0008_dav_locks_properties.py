"""dav_properties, dav_locks: WebDAV dead properties and locks in the main database (they were
in a SQLite file of each server's data directory, which gateway replicas could not share)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

DAV_URL = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "dav_properties",
        sa.Column("url", DAV_URL, primary_key=True),
        sa.Column("name", DAV_URL, primary_key=True),
        sa.Column("value", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "dav_locks",
        sa.Column("token", sa.String(100), primary_key=True),
        sa.Column("root", DAV_URL, nullable=False),
        sa.Column("principal", sa.String(100), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("depth", sa.String(16), nullable=False),
        sa.Column("owner", sa.LargeBinary(), nullable=False),
        sa.Column("timeout", sa.Float(), nullable=False),
        sa.Column("expire", sa.Float(), nullable=False),
    )
    op.create_index("ix_dav_locks_root", "dav_locks", ["root"])
    op.create_index("ix_dav_locks_expire", "dav_locks", ["expire"])


def downgrade() -> None:
    op.drop_table("dav_locks")
    op.drop_table("dav_properties")
