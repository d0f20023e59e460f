# sip-refuge developer targets. `make test` on a fresh Debian 12 machine installs everything it needs:
# Debian packages, the virtualenv (.venv) and Asterisk 22 (a Debian-unstable root folder, cached).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the tests and the demo need. mmdebstrap builds the Asterisk root folder and, with
# qemu-user-static, the arm64 Raspberry Pi root of the emulated post test; systemd gives systemd-analyze. The second line
# builds pjsua2 from pjproject source (BUILD_PACKAGES in sip_refuge/post/sip/pjsua2_build.py), the third
# cross-compiles it for the emulated Raspberry Pi (HOST_PACKAGES in pjsua2_cross.py). TLS certificates
# come from Python's cryptography; libspeexdsp1 is both backends' echo canceller and espeak-ng speaks the speech
# benchmark's sentences; and the wire test captures lo with a raw socket as root (no tcpdump). The
# fail2ban tests run a fail2ban-server of their own; on a host with systemd,
# Debian also enables the fail2ban service (its sshd jail) at install: `systemctl disable --now fail2ban` if
# the machine should not have it. nginx: the TLS proxy recipe's test runs its own nginx on loopback (Debian
# enables the nginx service too); openssl makes its self-signed certificate.
DEB_PACKAGES := python3-venv mmdebstrap vlc-bin vlc-plugin-base util-linux sqlite3 nftables \
	build-essential swig xz-utils python3-dev libssl-dev libopus-dev libsrtp2-dev libspeex-dev libspeexdsp-dev libasound2-dev \
	g++-aarch64-linux-gnu \
	gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly python3-gi \
	chromium fail2ban nginx openssl qemu-user-static systemd git libspeexdsp1 espeak-ng
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all venv deps asterisk pjsua2 pjsua2-arm64 pi-root lint test unit integration demo clean

all: test

deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo ">> installing Debian packages: $$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

$(BIN)/.installed: setup.cfg pyproject.toml
	@echo ">> creating the virtualenv $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[test,camera]'
	@touch $@

# pjsua2: the official SWIG binding, built from pjproject source once per pjproject version, Python and
# machine, and cached beside the Asterisk root (~/.cache/sip-refuge/pjsua2, or $SIP_REFUGE_CACHE/pjsua2).
# The stamp records the installed wheel.
$(BIN)/.pjsua2: $(BIN)/.installed sip_refuge/post/sip/pjsua2_build.py | deps
	@wheel=$$($(BIN)/python -m sip_refuge.post.sip.pjsua2_build) && \
	$(BIN)/pip install -q --no-deps --force-reinstall "$$wheel" && echo "$$wheel" > $@

# The Raspberry Pi's pjsua2 wheel (arm64, Debian 12's Python 3.11), cross-compiled here and cached beside it
# (with the arm64 sysroot it builds against); the emulated Pi post installs it as README.md says.
$(BIN)/.pjsua2-arm64: $(BIN)/.installed sip_refuge/post/sip/pjsua2_build.py sip_refuge/post/sip/pjsua2_cross.py | deps
	@wheel=$$($(BIN)/python -m sip_refuge.post.sip.pjsua2_build --target aarch64) && echo "$$wheel" > $@

venv: $(BIN)/.installed $(BIN)/.pjsua2

pjsua2: $(BIN)/.pjsua2

pjsua2-arm64: $(BIN)/.pjsua2-arm64

asterisk: deps venv
	@$(BIN)/python -m sip_refuge.pbx.asterisk

# The emulated Raspberry Pi's root folder (arm64 Debian 12 under qemu, cached like Asterisk's).
pi-root: deps venv
	@$(BIN)/python -m tests.support.pi_root

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -q tests/unit

integration: deps venv asterisk pi-root pjsua2-arm64
	$(BIN)/pytest -q tests/integration

test: deps venv asterisk pi-root pjsua2-arm64 lint
	$(BIN)/pytest -q

demo: deps venv asterisk
	$(BIN)/sip-refuge demo

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
