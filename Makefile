# The two commands that matter (see README.md):
#   make run   — set up and run the operator on the embedded default
#   make test  — set up and run the whole test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test setup system-deps controlplane lint crds bench clean

run: setup
	$(VENV)/bin/libvirt-operator dev

test: setup
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest

setup: system-deps $(STAMP) controlplane

system-deps:
	@bash hack/install-system-deps.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[rag,test]'
	@touch $(STAMP)

controlplane:
	@bash hack/ensure-controlplane.sh >/dev/null

lint: $(STAMP)
	$(VENV)/bin/lint-imports

crds: $(STAMP)
	$(VENV)/bin/libvirt-operator crds --write crds/
	cp crds/*.yaml charts/libvirt-operator/crds/

clean:
	rm -rf .dev
