# Two commands do all set-up on a fresh Debian machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The TPM backend's library builds against the TSS2 C libraries: include it where they are.
EXTRAS := test$(shell pkg-config --exists tss2-esys 2>/dev/null && echo ,tpm)

.PHONY: demo test install mosquitto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

# Mosquitto is the terminus. Installed where we can (root on Debian); otherwise the demo says
# plainly that it runs without one.
mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing mosquitto (the terminus) with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	else \
		echo "mosquitto is not installed and cannot be installed here (needs root on Debian):"; \
		echo "the demo onboards devices without a terminus and reports no telemetry."; \
	fi

demo: $(STAMP) mosquitto
	$(BIN)/zerotouch demo $(DEMO_ARGS)

test: $(STAMP) mosquitto
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) demo-state .pytest_cache
