# acrn-hsm-emu: set-up, run, test, bench. Every target installs what is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
APT_PKGS := fuse3 libfuse3-dev pkg-config gcc libc6-dev binutils make util-linux
ARGS ?=

.PHONY: setup run test lint bench soak fuzz clean apt venv

setup: apt venv

# System packages: installed only when one is missing (CI runs as root on a fresh machine).
apt:
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if ! $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null; then missing="$$missing python3-venv python3-dev"; fi; \
	if [ -n "$$missing" ]; then \
	  echo "setup: installing$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "setup: need root to apt-get install$$missing" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# The virtualenv, rebuilt when the package definition or a cffi build script changes.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py _cffi_src/build_fuse.py _cffi_src/build_native.py _cffi_src/fuse_decl.h _cffi_src/fuse_glue.c
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	@touch $@

run: setup
	$(VENV)/bin/acrn-hsm-emu serve $(ARGS)

lint: setup
	$(VENV)/bin/ruff check cdev acrn_hsm_emu tests bench _cffi_src

test: setup lint
	$(VENV)/bin/pytest $(ARGS)

bench: setup
	$(VPY) -m bench.run $(ARGS)

clean:
	rm -rf build *.egg-info tests/clients/bin bench/bin cdev/_fuse*.so acrn_hsm_emu/_native*.so
