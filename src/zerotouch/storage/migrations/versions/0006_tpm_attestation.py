"""TPM attestation: the session keeps the device's TPM evidence between hello and prove; the
inventory record says how the device was attested (or why it was refused)

Revision ID: 0006
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("gw_sessions") as batch:
        batch.add_column(sa.Column("attestation", sa.LargeBinary))
    with op.batch_alter_table("gw_inventory") as batch:
        batch.add_column(sa.Column("attestation", sa.String(512)))


def downgrade() -> None:
    with op.batch_alter_table("gw_inventory") as batch:
        batch.drop_column("attestation")
    with op.batch_alter_table("gw_sessions") as batch:
        batch.drop_column("attestation")
