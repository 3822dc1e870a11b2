"""one session per (device, nonce): a replayed hello opens nothing

Revision ID: 0002
Revises: 0001
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ux_gw_sessions_serial_nonce", "gw_sessions", ["serial", "nonce"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_gw_sessions_serial_nonce", table_name="gw_sessions")
