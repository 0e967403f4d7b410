"""transit_objects: scratch objects that expire 24 h after they are minted (issue 22, item 2)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-09
"""
import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "transit_objects",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("upload_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_transit_objects_user_id", "transit_objects", ["user_id"])
    op.create_index("ix_transit_objects_expires_at", "transit_objects", ["expires_at"])


def downgrade() -> None:
    op.drop_table("transit_objects")
