"""The TPM EST client's child hands errors back as data; the parent rebuilds the same classes,
so the swap (renewal.py) treats a TPM device's answers exactly as a software device's."""
from __future__ import annotations

import pytest

from zerotouch.agent.est_client import EstRefused, Pending
from zerotouch.agent.est_tpm import TpmEstClient, _describe, _rebuild
from zerotouch.protocol.errors import MalformedMessage, NotAuthorized, TryLater


@pytest.mark.parametrize("exc", [
    Pending("waiting for approval", retry_after=30),
    TryLater("busy", retry_after=5),
    EstRefused("EST simplereenroll refused: subject differs (HTTP 403)", status=403,
               code="est_refused"),
    EstRefused("EST simpleenroll refused: oops (HTTP 500)", status=500, code="est_refused"),
    MalformedMessage("EST answer is not valid base64"),
    NotAuthorized("EST simpleenroll answer certifies no key this device asked for"),
])
def test_protocol_errors_survive_the_process_boundary(exc):
    back = _rebuild(_describe(exc))
    assert type(back) is type(exc)
    assert (back.message, back.status, back.code, back.retry_after) == \
        (exc.message, exc.status, exc.code, exc.retry_after)


def test_transport_errors_become_os_errors():
    back = _rebuild(_describe(ConnectionRefusedError(111, "Connection refused")))
    assert isinstance(back, OSError) and "ConnectionRefusedError" in str(back)
    assert isinstance(_rebuild({}), OSError)


def test_missing_credential_is_an_os_error(tmp_path):
    with pytest.raises(OSError, match="credential missing"):
        TpmEstClient("https://127.0.0.1:1", ca_pem="", client_cert_file=tmp_path / "a.pem",
                     client_key_file=tmp_path / "a.tss2.pem", tcti="x", workdir=tmp_path)
