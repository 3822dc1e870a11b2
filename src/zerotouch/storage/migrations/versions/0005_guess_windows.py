"""OTP guessing limits in the database: the per-device count gets a time window (the lock lifts),
and failed guesses per source address move out of each process into a shared table

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # start of the device's current failure window; NULL = no wrong OTP yet. Counts from before
    # this migration get no window start, so an old permanent lock lifts with the first new guess
    # window (the service treats NULL with failed_claims > 0 as a window that began long ago).
    with op.batch_alter_table("rv_devices") as batch:
        batch.add_column(sa.Column("failed_since", sa.Float))
    # Counts only, keyed by source address (an IPv6 source by its /64): no OTP, no device.
    op.create_table(
        "rv_source_failures",
        sa.Column("source", sa.String(64), primary_key=True),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("window_start", sa.Float, nullable=False),
    )
    op.create_index("ix_rv_source_failures_window_start", "rv_source_failures", ["window_start"])


def downgrade() -> None:
    op.drop_index("ix_rv_source_failures_window_start", table_name="rv_source_failures")
    op.drop_table("rv_source_failures")
    with op.batch_alter_table("rv_devices") as batch:
        batch.drop_column("failed_since")
