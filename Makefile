# pwmail: `make demo` runs the whole system here, `make test` sets up and
# runs the tests. Both install what they need on a fresh Debian 12 (as root).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
APT_STAMP := .apt-installed
PYTEST_ARGS ?=

.PHONY: all deps venv build nss pdelivery debroots test lint lint-c demo clean

all: build

# Debian packages listed in deps/debian-packages.txt (comments stripped).
deps: $(APT_STAMP)
$(APT_STAMP): deps/debian-packages.txt
	@pkgs=$$(sed -e 's/#.*//' deps/debian-packages.txt | xargs); \
	missing=$$(for p in $$pkgs; do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done | xargs); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to install: $$missing" >&2; exit 1; fi; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@touch $@

venv: $(STAMP)
$(STAMP): pyproject.toml setup.py pwcache/build_pwtable.py pop/build_engine.py pwcache/_csrc/client-sources.txt \
          $(wildcard pwcache/_csrc/*.c pwcache/_csrc/*.h pop/_csrc/*.c pop/_csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel cffi
	@# setuptools' note on every editable install (folders named like the
	@# package take precedence: here they are the package) is not for us.
	PYTHONWARNINGS="ignore:Editable installation" $(PIP) install -q -e '.[test]'
	@touch $@

nss: $(APT_STAMP)
	$(MAKE) -C nss_module

# pdelivery, Sendmail's local mailer, is C (delivery/_csrc): the venv's
# `pdelivery` command, where the tests, the test bed and the demo find it.
# pip installs it (setup.py: a data file of bin/); this re-installs it after a
# change of its C sources, which does not re-run pip.
PDELIVERY := $(VENV)/bin/pdelivery
pdelivery: $(PDELIVERY)
$(PDELIVERY): $(STAMP) $(APT_STAMP) $(wildcard delivery/_csrc/*.c delivery/_csrc/*.h pwcache/_csrc/*.c pwcache/_csrc/*.h) \
              delivery/_csrc/Makefile pwcache/_csrc/client-sources.txt
	$(MAKE) -C delivery/_csrc
	install -m 0755 delivery/_csrc/pdelivery $@

# Postfix for tests/delivery/test_delivery_postfix.py: its package conflicts
# with sendmail-bin, so it is not installed but unpacked (apt-get download,
# dpkg -x) into /var/cache/pwmail-test/postfix/root, once
# (tests/support/debroot.py). Needs root, as the Debian packages above.
debroots: $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then $(PY) -m tests.support.debroot postfix >/dev/null; fi

build: deps venv nss pdelivery debroots

test: build
	@set +e; $(VENV)/bin/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest ran no test: failing" >&2; exit 1; fi; exit $$rc

# ruff (lint and format), the layer contracts of DESIGN.md (import-linter,
# [tool.importlinter] in pyproject.toml), and every C file warning-free.
lint: venv lint-c
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

C_SOURCES := $(wildcard pwcache/_csrc/*.c nss_module/*.c pop/_csrc/*.c delivery/_csrc/*.c)
lint-c: $(APT_STAMP)
	@for f in $(C_SOURCES); do \
	  cc -std=gnu11 -O2 -Wall -Wextra -Werror -fsyntax-only -D_FORTIFY_SOURCE=2 \
	     -Ipwcache/_csrc -Inss_module -Ipop/_csrc -Idelivery/_csrc $$f || exit 1; \
	done; echo "C: $(words $(C_SOURCES)) files, no warnings"

demo: build
	$(VENV)/bin/pwmail demo

clean:
	rm -rf build *.egg-info pwcache/_pwtable*.so pwcache/_pwtable.c pop/_engine*.so pop/_engine.c
	$(MAKE) -C nss_module clean
	$(MAKE) -C delivery/_csrc clean
