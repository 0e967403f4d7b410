"""cli_login_codes: one-time codes of `kgpu login --browser`, bound to a PKCE challenge (gateway/cli_login.py)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cli_login_codes",
        sa.Column("code_hash", sa.String(64), primary_key=True),
        sa.Column("code_challenge", sa.String(43), nullable=False),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("token_id", sa.Integer(), sa.ForeignKey("api_tokens.id", ondelete="CASCADE"), nullable=False),
        sa.Column("sealed_token", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("used_at", sa.Float(), nullable=True),
    )
    op.create_index("ix_cli_login_codes_user_id", "cli_login_codes", ["user_id"])
    op.create_index("ix_cli_login_codes_expires_at", "cli_login_codes", ["expires_at"])


def downgrade() -> None:
    op.drop_table("cli_login_codes")
