# acrn-hsm-emu: set-up, run, test, bench. Every target installs what is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
APT_PKGS := fuse3 libfuse3-dev pkg-config gcc libc6-dev binutils make util-linux
# Only the tests need these: systemd-analyze verifies the unit, strace checks its system call filter.
TEST_APT_PKGS := systemd strace
# make test-vm: qemu (TCG), depmod for the unpacked kernel, a static busybox for the initramfs.
VM_APT_PKGS := qemu-system-x86 kmod busybox-static
APT_INSTALL_OPTS ?=
ARGS ?=

# make install: the package and its dependencies in a private directory (nothing goes
# into the system Python), a launcher, the systemd unit, a default config, the docs.
DESTDIR ?=
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib/acrn-hsm-emu
DOCDIR ?= $(PREFIX)/share/doc/acrn-hsm-emu
UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSCONFDIR ?= /etc
INSTALL_PYTHON ?= /usr/bin/python3
CONFIG := $(SYSCONFDIR)/acrn-hsm-emu/config.toml
UNIT := acrn-hsm-emu.service
# The installed unit names the installed paths.
UNIT_SED := -e 's|/usr/local/bin/|$(BINDIR)/|g' -e 's|/usr/local/share/doc/acrn-hsm-emu|$(DOCDIR)|g' \
	-e 's|/etc/acrn-hsm-emu/|$(SYSCONFDIR)/acrn-hsm-emu/|g'
SYSTEMD_RUNNING = [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]

.PHONY: setup run test test-vm lint sanitize bench soak fuzz clean apt apt-test apt-vm venv install uninstall

setup: apt venv

# System packages: installed only when one is missing (CI runs as root on a fresh machine).
apt:
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if ! $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null; then missing="$$missing python3-venv python3-dev"; fi; \
	if [ -n "$$missing" ]; then \
	  echo "setup: installing$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "setup: need root to apt-get install$$missing" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_INSTALL_OPTS) $$missing; \
	fi

apt-test:
	@$(MAKE) --no-print-directory apt APT_PKGS="$(TEST_APT_PKGS)"

# Without recommends: qemu's would bring a GUI, firmware and block drivers the VM never uses.
apt-vm:
	@$(MAKE) --no-print-directory apt APT_PKGS="$(VM_APT_PKGS)" APT_INSTALL_OPTS=--no-install-recommends

# The virtualenv, rebuilt when the package definition, a cffi build script or declaration,
# or a C file changes.
NATIVE_INPUTS := $(wildcard _cffi_src/*.py _cffi_src/*.h native/*.c native/*.h include/*.h)

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(NATIVE_INPUTS)
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	@# setuptools' notice that an editable install is editable is all it would print: hide it
	PYTHONWARNINGS="ignore:Editable installation" $(VPY) -m pip install -q -e '.[test]'
	@touch $@

run: setup
	$(VENV)/bin/acrn-hsm-emu serve $(ARGS)

lint: setup
	$(VENV)/bin/ruff check cdev acrn_hsm_emu tests bench examples _cffi_src vmtest
	$(VENV)/bin/mypy

test: setup apt-test lint
	$(VENV)/bin/pytest $(ARGS)

# The tests that run the C (the express path, the vCPU cycle and KVM loop, cdev's reader and
# glue, client memory, the launcher), against a copy of the tree whose cffi modules are built with ASan and
# UBSan; libasan is preloaded since the interpreter is not instrumented. Leak checking is off:
# LeakSanitizer does not scan pymalloc's arenas, so whatever a Python object points to looks
# leaked, and every process the tests start (compilers too) reports. Any report fails it.
SANITIZE_DIR := build/sanitize
SANITIZE_TESTS ?= tests/test_express*.py tests/test_kvm_*.py tests/test_eventfd_*.py \
	tests/test_hsm_*.py tests/test_cdev_*.py tests/test_ioreq_*.py tests/test_hypervisor_vcpu.py \
	tests/test_ext_range_clients.py tests/test_client_library.py tests/test_faults.py \
	tests/test_launcher.py

sanitize: setup
	rm -rf $(SANITIZE_DIR) && mkdir -p $(SANITIZE_DIR)/tree $(SANITIZE_DIR)/reports
	git ls-files -z -co --exclude-standard | tar -c --null -T - --ignore-failed-read | tar -x -C $(SANITIZE_DIR)/tree
	cd $(SANITIZE_DIR)/tree && $(CURDIR)/$(VPY) _cffi_src/build_sanitized.py
	@cd $(SANITIZE_DIR)/tree && PYTHONPATH=$$PWD LD_PRELOAD=$$(gcc -print-file-name=libasan.so) \
	  ASAN_OPTIONS=detect_leaks=0:log_path=$(CURDIR)/$(SANITIZE_DIR)/reports/asan \
	  UBSAN_OPTIONS=print_stacktrace=1:log_path=$(CURDIR)/$(SANITIZE_DIR)/reports/ubsan \
	  $(CURDIR)/$(VENV)/bin/pytest -p no:cacheprovider $(ARGS) $(SANITIZE_TESTS); status=$$?; \
	cd $(CURDIR); if [ -n "$$(ls -A $(SANITIZE_DIR)/reports)" ]; then \
	  echo "sanitize: reports in $(SANITIZE_DIR)/reports:" >&2; head -n 60 $(SANITIZE_DIR)/reports/* >&2; exit 1; \
	fi; echo "sanitize: no ASan or UBSan report"; exit $$status

# Debian's stock kernel (CUSE) under qemu: the CUSE half of the suite, then the installed
# service under systemd as PID 1 (vmtest/, README "VM tests"). Caches in VMTEST_CACHE (.vmtest/).
test-vm: setup apt-test apt-vm lint
	$(VENV)/bin/pytest -s -p no:cacheprovider vmtest/test_vm.py $(ARGS)

# Benchmarks (not tests): figures next to floors measured in the same run; plotting needs matplotlib.
bench: setup $(VENV)/.bench
	$(VPY) -m bench.run $(ARGS)

$(VENV)/.bench: $(VENV)/.installed
	$(VPY) -m pip install -q -e '.[test,bench]'
	@touch $@

# The long runs of issue-sized checks: 1,000,000 requests over 16 VMs x 2 vCPUs, and a long fuzz.
soak: setup
	SOAK_REQUESTS=$${SOAK_REQUESTS:-1000000} $(VENV)/bin/pytest -q -s -p no:cacheprovider tests/test_soak.py

fuzz: setup
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-20000} $(VENV)/bin/pytest -q -s -p no:cacheprovider tests/test_fuzz_abi.py \
		tests/test_launcher.py -k 'fuzz'

install: venv
	@pyver='import sys; print(sys.version_info[:2])'; \
	[ "$$($(INSTALL_PYTHON) -c "$$pyver")" = "$$($(VPY) -c "$$pyver")" ] \
	  || { echo "install: $(INSTALL_PYTHON) is not the Python version of $(VPY), which builds the package" >&2; exit 1; }
	rm -rf $(DESTDIR)$(LIBDIR)
	$(VPY) -m pip install -q --no-warn-script-location --target $(DESTDIR)$(LIBDIR) .
	rm -rf $(DESTDIR)$(LIBDIR)/bin build
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(DOCDIR) $(DESTDIR)$(SYSCONFDIR)/acrn-hsm-emu
	sed -e 's|@PYTHON@|$(INSTALL_PYTHON)|' -e 's|@LIBDIR@|$(LIBDIR)|' systemd/acrn-hsm-emu.in > $(DESTDIR)$(BINDIR)/acrn-hsm-emu
	chmod 755 $(DESTDIR)$(BINDIR)/acrn-hsm-emu
	sed $(UNIT_SED) systemd/$(UNIT) > $(DESTDIR)$(UNITDIR)/$(UNIT)
	chmod 644 $(DESTDIR)$(UNITDIR)/$(UNIT)
	@# An existing config is the administrator's: never overwritten.
	@if [ -e $(DESTDIR)$(CONFIG) ]; then echo "install: keeping $(DESTDIR)$(CONFIG)"; \
	else install -m 644 systemd/config.toml $(DESTDIR)$(CONFIG); fi
	install -m 644 README.md docs/*.md $(DESTDIR)$(DOCDIR)/
	@# what the docs run: the examples (PYTHONPATH=$(LIBDIR) python3 ...) and the C clients' sources
	install -d $(DESTDIR)$(DOCDIR)/examples $(DESTDIR)$(DOCDIR)/clients
	install -m 644 examples/launch.py examples/uart.py examples/hello.S $(DESTDIR)$(DOCDIR)/examples/
	install -m 644 tests/clients/dm_loop.c tests/clients/hsm_errno.c $(DESTDIR)$(DOCDIR)/clients/
	@if $(SYSTEMD_RUNNING); then systemctl daemon-reload; fi

uninstall:
	@if $(SYSTEMD_RUNNING); then systemctl disable --now $(UNIT) 2>/dev/null || true; fi
	rm -rf $(DESTDIR)$(LIBDIR) $(DESTDIR)$(DOCDIR)
	rm -f $(DESTDIR)$(BINDIR)/acrn-hsm-emu $(DESTDIR)$(UNITDIR)/$(UNIT)
	@# The config goes only if it is still the one we installed.
	@if cmp -s systemd/config.toml $(DESTDIR)$(CONFIG); then rm -f $(DESTDIR)$(CONFIG); \
	elif [ -e $(DESTDIR)$(CONFIG) ]; then echo "uninstall: keeping the modified $(DESTDIR)$(CONFIG)"; fi
	-@rmdir $(DESTDIR)$(SYSCONFDIR)/acrn-hsm-emu 2>/dev/null || true
	@if $(SYSTEMD_RUNNING); then systemctl daemon-reload; fi

clean:
	rm -rf build *.egg-info tests/clients/bin bench/bin cdev/_fuse*.so acrn_hsm_emu/_native*.so acrn_hsm_emu/_launcher*.so
