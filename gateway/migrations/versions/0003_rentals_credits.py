"""rentals, the per-minute credit ledger, in-pod tokens

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rentals",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(30), nullable=False),
        sa.Column("image", sa.String(300), nullable=False),
        sa.Column("node", sa.String(100), nullable=False),
        sa.Column("gpu_model", sa.String(50), nullable=False),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("gpu_indices", sa.String(100), nullable=False, server_default=""),
        sa.Column("cpu", sa.Float(), nullable=False),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("ephemeral_storage_gib", sa.Integer(), nullable=False),
        sa.Column("duration_hours", sa.Integer(), nullable=False),
        sa.Column("env_json", sa.Text(), nullable=False, server_default="{}"),
        sa.Column("backend", sa.String(20), nullable=False),
        sa.Column("pod_ref", sa.String(200), nullable=True),
        sa.Column("phase", sa.String(20), nullable=False),
        sa.Column("ready", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("pending_reason", sa.String(300), nullable=True),
        sa.Column("end_reason", sa.String(300), nullable=True),
        sa.Column("price_per_hour_credits", sa.Integer(), nullable=False),
        sa.Column("idle_warning", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_activity_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_rentals_user_id", "rentals", ["user_id"])
    op.create_index("ix_rentals_phase", "rentals", ["phase"])
    op.create_table(
        "credit_charges",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("rental_id", sa.String(40), sa.ForeignKey("rentals.id", ondelete="CASCADE"), nullable=False),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("minute", sa.Integer(), nullable=False),
        sa.Column("credits", sa.Integer(), nullable=False),
        sa.Column("charged_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("rental_id", "minute"),
    )
    op.create_index("ix_credit_charges_user_id", "credit_charges", ["user_id"])
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("rental_id", sa.String(40), nullable=True))
        batch.create_index("ix_api_tokens_rental_id", ["rental_id"])


def downgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_index("ix_api_tokens_rental_id")
        batch.drop_column("rental_id")
    op.drop_table("credit_charges")
    op.drop_index("ix_rentals_phase", table_name="rentals")
    op.drop_index("ix_rentals_user_id", table_name="rentals")
    op.drop_table("rentals")
