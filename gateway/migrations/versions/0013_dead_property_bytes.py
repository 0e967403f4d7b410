"""drive_usage.property_bytes: a drive's WebDAV dead properties count in its quota (issue 19,
item 12), counted here for the properties already kept

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-08
"""
import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("drive_usage") as batch:
        batch.add_column(sa.Column("property_bytes", sa.BigInteger(), nullable=False, server_default="0"))
    # The properties there are now: a drive's ref URLs run from "/users/7/" to "/users/70" (its
    # prefix's characters need no quoting), compared byte by byte as drive/dav/storage.py does.
    collate = ' COLLATE "C"' if op.get_bind().dialect.name == "postgresql" else ""
    op.execute(
        sa.text(
            "UPDATE drive_usage SET property_bytes = COALESCE((SELECT SUM(length(p.name) + length(p.value)) "
            f"FROM dav_properties p WHERE p.url >= ('/' || drive_usage.prefix){collate} "
            f"AND p.url < ('/' || substr(drive_usage.prefix, 1, length(drive_usage.prefix) - 1) || '0'){collate}), 0)"
        )
    )


def downgrade() -> None:
    with op.batch_alter_table("drive_usage") as batch:
        batch.drop_column("property_bytes")
