"""Tables. The rendezvous and the owner side may share one database (the demo does) or not."""
from __future__ import annotations

from sqlalchemy import (Column, Float, Integer, LargeBinary, MetaData, String, Table, Index)

metadata = MetaData()

rv_devices = Table(
    "rv_devices", metadata,
    Column("serial", String(64), primary_key=True),
    Column("urn", String(128), nullable=False),
    Column("idevid_der", LargeBinary, nullable=False),
    Column("otp_salt", LargeBinary, nullable=False),
    Column("otp_hash", LargeBinary, nullable=False),
    Column("status", String(16), nullable=False),
    Column("gateway_url", String(256)),
    Column("owner_fp", LargeBinary),
    Column("created_at", Float, nullable=False),
    Column("claimed_at", Float),
    Column("registered_at", Float),
    Column("failed_claims", Integer, nullable=False, default=0),
    Column("failed_since", Float),   # start of the current failure window (migration 0005)
    Column("gateway_edhoc_fp", LargeBinary),  # the gateway's EDHOC key pin (migration 0007)
)

# Failed OTP guesses per source address in a fixed window, shared by every rendezvous replica.
# Counts only: no OTP, no device.
rv_source_failures = Table(
    "rv_source_failures", metadata,
    Column("source", String(64), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("window_start", Float, nullable=False),
    Index("ix_rv_source_failures_window_start", "window_start"),
)

gw_inventory = Table(
    "gw_inventory", metadata,
    Column("serial", String(64), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("description", String(256), nullable=False, default=""),
    Column("idevid_fp", LargeBinary),
    Column("ldevid_serial", String(64)),
    Column("last_error", String(512)),
    Column("created_at", Float, nullable=False),
    Column("onboarded_at", Float),
    Column("attestation", String(512)),
)

gw_sessions = Table(
    "gw_sessions", metadata,
    Column("id", LargeBinary(16), primary_key=True),
    Column("serial", String(64), nullable=False),
    Column("nonce", LargeBinary, nullable=False),
    Column("challenge", LargeBinary, nullable=False),
    Column("idevid_fp", LargeBinary, nullable=False),
    Column("state", String(16), nullable=False),
    Column("expires", Float, nullable=False),
    Column("ldevid_der", LargeBinary),
    Column("idevid_der", LargeBinary),
    Column("attestation", LargeBinary),   # TPM evidence from hello (services/attestation.py)
    Index("ix_gw_sessions_expires", "expires"),
    # A nonce answers one hello only: a replayed hello cannot open a second session.
    Index("ux_gw_sessions_serial_nonce", "serial", "nonce", unique=True),
)

vault_secrets = Table(
    "vault_secrets", metadata,
    Column("kind", String(32), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("ciphertext", LargeBinary, nullable=False),
)

gw_certificates = Table(
    "gw_certificates", metadata,
    Column("serial_number", String(64), primary_key=True),
    Column("device_serial", String(64), nullable=False, index=True),
    Column("der", LargeBinary, nullable=False),
    Column("not_after", Float, nullable=False),
    Column("kind", String(16), nullable=False, server_default="ldevid"),
    Column("issued_at", Float, nullable=False, server_default="0"),
    Column("revoked_at", Float),
    Column("reason", String(32)),
    Index("ix_gw_certificates_revoked_at", "revoked_at"),
)

est_requests = Table(
    "est_requests", metadata,
    Column("id", String(64), primary_key=True),
    Column("device_serial", String(64), nullable=False, index=True),
    Column("label", String(64), nullable=False),
    Column("csr_der", LargeBinary, nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("decided_at", Float),
    Column("cert_serial", String(64)),
)
