"""The TPM 2.0 identity backend: the only package that imports tpm2-pytss.

core.py: ESAPI connection, EK, AK, credential activation, handle hygiene.
"""
from .core import AkBlob, ActivationError, Tpm, TpmError, open_tpm

__all__ = ["AkBlob", "ActivationError", "Tpm", "TpmError", "open_tpm"]
