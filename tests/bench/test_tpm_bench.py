"""`zerotouch bench tpm` for a few rounds: consecutive onboardings leave no TPM handles behind
(the command prints figures; the full 1,000 rounds are in the README)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support import need  # noqa: E402
from zerotouch.util.swtpm import INSTALL_HINT, have_swtpm  # noqa: E402


def test_consecutive_tpm_onboardings_leak_no_handles(capsys):
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError:
        need("tpm2-pytss", INSTALL_HINT)
    if not have_swtpm():
        need("swtpm", INSTALL_HINT)
    from zerotouch.cli.main import main
    assert main(["bench", "tpm", "--onboardings", "30", "--check-every", "10"]) == 0
    out = capsys.readouterr().out
    assert "after    30: transient objects 0, sessions 0" in out
    assert "TPM handles before {'transient': 0, 'sessions': 0}, after {'transient': 0, 'sessions': 0}" in out
    # every onboarding really used the TPM: activation, quote, unseal, signatures
    per = float(out.split("per onboarding: ")[1].split(" TPM commands")[0])
    assert per >= 15
