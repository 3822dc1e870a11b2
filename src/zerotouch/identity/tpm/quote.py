"""PCRs and quotes on the device's TPM (the server checks them with ``attestation.quote``).

Only the SHA-256 bank is used: it is the bank the policies are written for, and SHA-1 PCRs
are not worth attesting. Values cross the boundary as plain bytes: ``quote`` returns the
marshalled TPMS_ATTEST and TPMT_SIGNATURE the server verifies.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (TPML_DIGEST_VALUES, TPML_PCR_SELECTION, TPMS_SCHEME_HASH,
                              TPMT_HA, TPMT_SIG_SCHEME, TPMU_HA, TPMU_SIG_SCHEME)

from .core import Tpm, TpmError

PCR_COUNT = 24
MAX_READ_ATTEMPTS = 5


def _indices(indices: Iterable[int]) -> list[int]:
    out = sorted(set(indices))
    if not out or any(not 0 <= i < PCR_COUNT for i in out):
        raise ValueError(f"PCR indices must be a non-empty set of 0..{PCR_COUNT - 1}")
    return out


def _selection(indices: list[int]) -> TPML_PCR_SELECTION:
    return TPML_PCR_SELECTION.parse("sha256:" + ",".join(map(str, indices)))


def _selected(sel: TPML_PCR_SELECTION) -> list[int]:
    """The SHA-256 PCR indices in a selection, in the order the TPM returns their values."""
    out = []
    for bank in list(sel.pcrSelections)[:sel.count]:
        if bank.hash != TPM2_ALG.SHA256:
            continue
        bitmap = bytes(bank.pcrSelect)[:bank.sizeofSelect]
        out += [8 * i + bit for i, b in enumerate(bitmap) for bit in range(8) if b >> bit & 1]
    return out


def read_pcrs(tpm: Tpm, indices: Iterable[int]) -> dict[int, bytes]:
    """The SHA-256 values of the given PCRs.

    TPM2_PCR_Read returns at most 8 digests per call (TPML_DIGEST), so several calls may be
    needed; the pcrUpdateCounter each call returns must not change between them, or a PCR was
    extended mid-read and the set could mix before and after: then all are read again."""
    wanted = _indices(indices)
    with tpm._timed("pcr_read"):
        for _attempt in range(MAX_READ_ATTEMPTS):
            values: dict[int, bytes] = {}
            counter = None
            while len(values) < len(wanted):
                rest = [i for i in wanted if i not in values]
                try:
                    update_counter, sel_out, digests = tpm.ctx.pcr_read(_selection(rest))
                except TSS2_Exception as e:
                    raise TpmError(f"PCR_Read failed: {e}") from e
                got = _selected(sel_out)
                if not got:
                    raise TpmError("this TPM has no SHA-256 PCR bank (or not these PCRs)")
                if len(got) != digests.count:
                    raise TpmError("PCR_Read returned a different number of values than PCRs")
                if counter is not None and update_counter != counter:
                    break  # extended between two reads: start over
                counter = update_counter
                for i, d in zip(got, list(digests.digests)[:digests.count]):
                    values[i] = bytes(d)
            else:
                return {i: values[i] for i in wanted}
    raise TpmError(f"PCRs kept changing while being read ({MAX_READ_ATTEMPTS} attempts)")


def quote(tpm: Tpm, ak_handle, nonce: bytes, indices: Iterable[int]) -> tuple[bytes, bytes]:
    """TPM2_Quote of the given SHA-256 PCRs with the AK (ECDSA, SHA-256) over `nonce`.

    Returns (marshalled TPMS_ATTEST, marshalled TPMT_SIGNATURE). The PCR values themselves
    travel separately (``read_pcrs``); the server checks them against the signed digest."""
    wanted = _indices(indices)
    if not 0 < len(nonce) <= 64:  # TPM2B_DATA; the TPM refuses more than a digest's worth
        raise ValueError("the nonce must be 1..64 bytes")
    scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA, details=TPMU_SIG_SCHEME(
        ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)))
    with tpm._timed("quote"):
        try:
            attest, signature = tpm.ctx.quote(ak_handle, _selection(wanted), bytes(nonce),
                                              scheme, session1=ESYS_TR.PASSWORD)
        except TSS2_Exception as e:
            raise TpmError(f"Quote failed: {e}") from e
    return bytes(attest.attestationData), signature.marshal()


def extend_pcr(tpm: Tpm, index: int, data: bytes) -> None:
    """Measure `data` into a PCR's SHA-256 bank: PCR := SHA-256(PCR || SHA-256(data)).

    For tests and the demo's simulated firmware change; a real device's firmware does this."""
    (index,) = _indices([index])
    digest = TPMT_HA(hashAlg=TPM2_ALG.SHA256,
                     digest=TPMU_HA(sha256=hashlib.sha256(bytes(data)).digest()))
    with tpm._timed("pcr_extend"):
        try:
            tpm.ctx.pcr_extend(ESYS_TR(index), TPML_DIGEST_VALUES([digest]),
                               session1=ESYS_TR.PASSWORD)
        except TSS2_Exception as e:
            raise TpmError(f"PCR_Extend of PCR {index} failed: {e}") from e
