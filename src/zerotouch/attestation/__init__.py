"""Server-side attestation checks (no TPM on the server): EK certificate chain, credential
activation (MakeCredential in pure Python), later PCR quote policy."""
