"""the session keeps the device's IDevID: later messages name it by kid (smaller CoAP messages)

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("gw_sessions") as batch:
        batch.add_column(sa.Column("idevid_der", sa.LargeBinary))


def downgrade() -> None:
    with op.batch_alter_table("gw_sessions") as batch:
        batch.drop_column("idevid_der")
