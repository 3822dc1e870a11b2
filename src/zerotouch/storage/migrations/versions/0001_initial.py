"""initial schema: rendezvous devices, owner inventory, sessions, vault secrets, certificates

Revision ID: 0001
"""
from alembic import op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rv_devices",
        sa.Column("serial", sa.String(64), primary_key=True),
        sa.Column("urn", sa.String(128), nullable=False),
        sa.Column("idevid_der", sa.LargeBinary, nullable=False),
        sa.Column("otp_salt", sa.LargeBinary, nullable=False),
        sa.Column("otp_hash", sa.LargeBinary, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("gateway_url", sa.String(256)),
        sa.Column("owner_fp", sa.LargeBinary),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("claimed_at", sa.Float),
        sa.Column("registered_at", sa.Float),
        sa.Column("failed_claims", sa.Integer, nullable=False),
    )
    op.create_table(
        "gw_inventory",
        sa.Column("serial", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("description", sa.String(256), nullable=False),
        sa.Column("idevid_fp", sa.LargeBinary),
        sa.Column("ldevid_serial", sa.String(64)),
        sa.Column("last_error", sa.String(512)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("onboarded_at", sa.Float),
    )
    op.create_table(
        "gw_sessions",
        sa.Column("id", sa.LargeBinary(16), primary_key=True),
        sa.Column("serial", sa.String(64), nullable=False),
        sa.Column("nonce", sa.LargeBinary, nullable=False),
        sa.Column("challenge", sa.LargeBinary, nullable=False),
        sa.Column("idevid_fp", sa.LargeBinary, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("expires", sa.Float, nullable=False),
        sa.Column("ldevid_der", sa.LargeBinary),
    )
    op.create_index("ix_gw_sessions_expires", "gw_sessions", ["expires"])
    op.create_table(
        "vault_secrets",
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("ciphertext", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "gw_certificates",
        sa.Column("serial_number", sa.String(64), primary_key=True),
        sa.Column("device_serial", sa.String(64), nullable=False),
        sa.Column("der", sa.LargeBinary, nullable=False),
        sa.Column("not_after", sa.Float, nullable=False),
    )
    op.create_index("ix_gw_certificates_device_serial", "gw_certificates", ["device_serial"])


def downgrade() -> None:
    for t in ("gw_certificates", "vault_secrets", "gw_sessions", "gw_inventory", "rv_devices"):
        op.drop_table(t)
