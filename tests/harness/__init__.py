"""Test harness helpers (control plane for integration tests, libvirtd sandboxes, ...)."""
