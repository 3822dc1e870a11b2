"""EST: certificate kinds and revocation, enrollment requests awaiting approval

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("gw_certificates") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="ldevid"))
        batch.add_column(sa.Column("issued_at", sa.Float, nullable=False, server_default="0"))
        batch.add_column(sa.Column("revoked_at", sa.Float))
        batch.add_column(sa.Column("reason", sa.String(32)))
    op.create_index("ix_gw_certificates_revoked_at", "gw_certificates", ["revoked_at"])
    op.create_table(
        "est_requests",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("device_serial", sa.String(64), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("csr_der", sa.LargeBinary, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("decided_at", sa.Float),
        sa.Column("cert_serial", sa.String(64)),
    )
    op.create_index("ix_est_requests_device_serial", "est_requests", ["device_serial"])


def downgrade() -> None:
    op.drop_table("est_requests")
    op.drop_index("ix_gw_certificates_revoked_at", table_name="gw_certificates")
    with op.batch_alter_table("gw_certificates") as batch:
        for col in ("reason", "revoked_at", "issued_at", "kind"):
            batch.drop_column(col)
