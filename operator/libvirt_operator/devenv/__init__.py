"""The dev-time environment: the real parts the embedded default (`libvirt-operator dev`, `make run`)
and the test harness (tests/harness) both start — a local control plane (etcd + kube-apiserver), local
libvirt hosts (real libvirtd on loopback, or test-driver host files) and the bootable test ISO.

The operator never imports this at run time (lint-imports: only `cli` may). Parts that build from
sources outside the Python package (the control plane, from hack/controlplane) need the source
checkout, found by :mod:`.checkout`.
"""
