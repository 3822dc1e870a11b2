"""the rendezvous keeps the owner gateway's EDHOC key fingerprint from the claim (cedhoc) and
puts it in the signed redirect, so a device using EDHOC pins the gateway

Revision ID: 0007
Revises: 0006
"""
from alembic import op
import sqlalchemy as sa

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rv_devices") as batch:
        batch.add_column(sa.Column("gateway_edhoc_fp", sa.LargeBinary))


def downgrade() -> None:
    with op.batch_alter_table("rv_devices") as batch:
        batch.drop_column("gateway_edhoc_fp")
