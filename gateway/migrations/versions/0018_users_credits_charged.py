"""users.credits_charged: each account's running total of credits charged for rentals, moved with
each ledger row (gateway/billing.py), so /metrics reads the credits charged in all without summing
the ledger; started here from the ledger already there

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06
"""
import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("credits_charged", sa.BigInteger(), nullable=False, server_default="0"))
    op.execute(
        sa.text(
            "UPDATE users SET credits_charged = COALESCE("
            "(SELECT SUM(c.credits) FROM credit_charges c WHERE c.user_id = users.id), 0)"
        )
    )


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("credits_charged")
