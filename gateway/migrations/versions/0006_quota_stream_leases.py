"""quota holds: a kind ("put" for presigned PUTs, "stream" for a streamed upload's lease)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("quota_holds") as batch:
        batch.add_column(sa.Column("kind", sa.String(8), nullable=False, server_default="put"))


def downgrade() -> None:
    with op.batch_alter_table("quota_holds") as batch:
        batch.drop_column("kind")
