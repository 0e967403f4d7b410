"""rental_ssh_keys: the SSH public key each rental pins, its fingerprint (gateway/ssh), and what
its latest activity was (run, ssh)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rentals") as batch:
        batch.add_column(sa.Column("ssh_pubkey", sa.Text(), nullable=True))
        batch.add_column(sa.Column("ssh_fingerprint", sa.String(100), nullable=True))
        batch.add_column(sa.Column("last_activity_kind", sa.String(20), nullable=True))
    op.create_index("ix_rentals_ssh_fingerprint", "rentals", ["ssh_fingerprint"])


def downgrade() -> None:
    op.drop_index("ix_rentals_ssh_fingerprint", table_name="rentals")
    with op.batch_alter_table("rentals") as batch:
        batch.drop_column("last_activity_kind")
        batch.drop_column("ssh_fingerprint")
        batch.drop_column("ssh_pubkey")
