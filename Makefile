# The two commands that matter (see README.md):
#   make run   — set up and run the operator on the embedded default
#   make test  — set up and run the whole test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test setup system-deps controlplane lint crds monitoring bench clean e2e-cluster

run: setup
	$(VENV)/bin/libvirt-operator dev

test: setup
	@bash hack/prebuild.sh
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest

# The control-plane build (minutes when cold, cached by go.sum; needs only Go) runs beside the system
# packages and the Python install.
setup:
	@bash hack/ensure-controlplane.sh >/dev/null & cp=$$!; \
	  bash hack/install-system-deps.sh && $(MAKE) --no-print-directory $(STAMP); rc=$$?; wait $$cp || rc=$$?; exit $$rc

system-deps:
	@bash hack/install-system-deps.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[rag,test]'
	@touch $(STAMP)

controlplane:
	@bash hack/ensure-controlplane.sh >/dev/null

# The helm end-to-end tests against your own cluster (e.g. kind: hack/kind/cluster.yaml), with an
# operator image it can pull: make e2e-cluster KUBECONFIG=~/.kube/config IMAGE=registry/libvirt-operator:tag
e2e-cluster: $(STAMP)
	@test -n "$(KUBECONFIG)" || { echo "usage: make e2e-cluster KUBECONFIG=path [IMAGE=repo:tag]" >&2; exit 2; }
	LIBVIRT_OPERATOR_E2E_KUBECONFIG="$(abspath $(KUBECONFIG))" LIBVIRT_OPERATOR_E2E_IMAGE="$(IMAGE)" \
		$(VENV)/bin/pytest tests/e2e/test_helm.py tests/e2e/test_cluster.py

lint: $(STAMP)
	$(VENV)/bin/lint-imports

crds: $(STAMP)
	$(VENV)/bin/libvirt-operator crds --write crds/
	cp crds/*.yaml charts/libvirt-operator/crds/

monitoring: $(STAMP)
	$(PY) hack/monitoring/generate.py

# docs/images/dashboard.png: the Grafana dashboard drawn by hack/monitoring/render.py from its own
# queries against the Prometheus of the scenario test (host outage, crash loop, 50 VMs); no Grafana.
# Against your own Prometheus: $(PY) hack/monitoring/render.py --prometheus URL --last 1h --out x.png
.PHONY: dashboard-picture
dashboard-picture: setup
	$(PY) -m pip install -q -e '.[dashboard]'
	LIBVIRT_OPERATOR_DASHBOARD_PNG="$(CURDIR)/docs/images/dashboard.png" \
		$(VENV)/bin/pytest tests/integration/test_prometheus_scenario.py

clean:
	rm -rf .dev
