"""OpenSSL configuration so Python's ``ssl`` uses a TPM-resident key (TSS2 PEM) for TLS.

Python's ``ssl`` cannot load OpenSSL providers itself: the tpm2 provider (tpm2-openssl) must be
activated by an OPENSSL_CONF file read when libcrypto initialises, and TPM2OPENSSL_TCTI must name
the TPM, both in the environment *before the process starts*. So the agent runs its TLS client
(paho-mqtt, EST over https) in a child process started with ``tpm_tls_environment(...)``.

Findings behind this module (swtpm, system OpenSSL 3.0.22 under Python's ssl, tpm2-openssl
1.1.1, cryptography 49 with its own bundled OpenSSL 4.0):
  * ``import cryptography`` works in such a process (it reads the same OPENSSL_CONF);
  * ``ssl.SSLContext.load_cert_chain(cert.pem, key.tss2.pem)`` accepts the TSS2 PEM (the tpm2
    provider's decoder loads the key under the SRK); with another TPM it raises ssl.SSLError;
  * signing needs ``default_properties = ?provider=tpm2`` (tpm2-openssl's documented recipe,
    used below): OpenSSL 3.0 fetches the ECDSA signature from the first matching provider, not
    from the key's, and without the preference the default provider gets a public-only export
    ("missing private key"). The preference also moves the TLS transcript hashes into the TPM
    (hash sequence objects, duplicated by EVP_MD_CTX_copy);
  * so the TPM must be behind a resource manager, as on a real device (/dev/tpmrm0, TCTI
    ``device:/dev/tpmrm0``) or tpm2-abrmd (TCTI ``tabrmd:bus_type=session,bus_name=NAME``, see
    zerotouch.util.swtpm): it swaps the sequence objects out, and the handshake completes
    (TLS 1.3, tested on swtpm behind tpm2-abrmd 3.0.0). Straight on swtpm (no resource
    manager, 3 object slots) it fails in ContextLoad with TPM_RC_OBJECT_MEMORY;
  * paho-mqtt only takes an ``ssl.SSLContext``, so it inherits exactly the ssl behaviour above;
  * the provider opens its TPM connection when loaded and keeps it for the process lifetime:
    on swtpm's single-connection socket no other client (tpm2-pytss) gets in meanwhile;
    behind a resource manager both share the TPM at the same time;
  * a tabrmd TCTI on the session bus also needs DBUS_SESSION_BUS_ADDRESS in the child's
    environment (the TCTI string cannot name the bus): ``tpm_tls_environment`` adds it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

PROVIDER_NAME = "tpm2"
_OPENSSL_INFO_MODULES_DIR = 1003  # OPENSSL_info() selector (openssl/crypto.h, 3.x)


def _modules_dir() -> Path | None:
    """The provider directory of the libcrypto Python's ``ssl`` module is linked against."""
    import ssl  # noqa: F401  (makes sure that libcrypto is the one loaded)
    name = ctypes.util.find_library("crypto")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.OPENSSL_info.restype = ctypes.c_char_p
        lib.OPENSSL_info.argtypes = [ctypes.c_int]
        path = lib.OPENSSL_info(_OPENSSL_INFO_MODULES_DIR)
    except (OSError, AttributeError):
        return None
    return Path(path.decode()) if path else None


def provider_module() -> Path | None:
    """Path of tpm2.so for Python's OpenSSL, or None when tpm2-openssl is not installed."""
    env = os.environ.get("OPENSSL_MODULES")
    for d in filter(None, (Path(env) if env else None, _modules_dir())):
        if (d / f"{PROVIDER_NAME}.so").is_file():
            return d / f"{PROVIDER_NAME}.so"
    return None


def tpm_provider_available() -> bool:
    """tpm2-openssl is installed for the OpenSSL that Python's ``ssl`` uses (OpenSSL 3+)."""
    import ssl
    return ssl.OPENSSL_VERSION_INFO >= (3, 0) and provider_module() is not None


def openssl_config(module: Path) -> str:
    # `default` must be activated explicitly: once a config activates any provider, OpenSSL
    # no longer loads the default one implicitly, and TLS needs its ciphers and digests.
    # The system config is included first so its policies (e.g. MinProtocol) still apply.
    system = _system_config()
    include = f".include {system}\n" if system else ""
    return (f"{include}"
            "openssl_conf = zerotouch_tpm_init\n\n"
            "[zerotouch_tpm_init]\nproviders = zerotouch_tpm_providers\n"
            "alg_section = zerotouch_tpm_properties\n\n"
            "[zerotouch_tpm_properties]\ndefault_properties = ?provider=tpm2\n\n"
            "[zerotouch_tpm_providers]\ndefault = zerotouch_default\n"
            f"{PROVIDER_NAME} = zerotouch_tpm2\n\n"
            "[zerotouch_default]\nactivate = 1\n\n"
            f"[zerotouch_tpm2]\nmodule = {module}\nactivate = 1\n")


def _system_config() -> str | None:
    return None  # the system openssl_conf would compete with ours for the same key


def _needs_session_bus(tcti: str) -> bool:
    name, _, conf = tcti.partition(":")
    return name in ("tabrmd", "libtss2-tcti-tabrmd.so.0") and "bus_type=session" in conf


def tpm_tls_environment(tcti: str, workdir: Path, *,
                        dbus_address: str | None = None) -> dict[str, str]:
    """Write ``workdir/openssl-tpm2.cnf`` and return the variables to add to a child process's
    environment so its ``ssl`` contexts can use TSS2 PEM keys in the TPM at ``tcti``.

    The TPM should be behind a resource manager (``device:/dev/tpmrm0`` or tpm2-abrmd): the
    handshake needs more object slots than a bare TPM has. For tpm2-abrmd on a session bus
    (``tabrmd:bus_type=session,...``) the bus address is ``dbus_address`` or, by default, this
    process's DBUS_SESSION_BUS_ADDRESS."""
    env = {}
    if _needs_session_bus(tcti):
        address = dbus_address or os.environ.get("DBUS_SESSION_BUS_ADDRESS")
        if not address:
            raise RuntimeError(f"TCTI {tcti!r} is on a D-Bus session bus, but no bus address "
                               "was given and DBUS_SESSION_BUS_ADDRESS is not set")
        env["DBUS_SESSION_BUS_ADDRESS"] = address
    module = provider_module()
    if module is None:
        raise RuntimeError("tpm2-openssl is not installed (apt-get install tpm2-openssl)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "openssl-tpm2.cnf"
    conf.write_text(openssl_config(module))
    return {**env, "OPENSSL_CONF": str(conf), "TPM2OPENSSL_TCTI": tcti}
