"""libvirt-python for tests, with its default error handler (which prints every error to stderr)
silenced; None where the binding is missing, and the fixtures then skip with the reason."""

from __future__ import annotations

try:
    import libvirt
except ImportError:
    libvirt = None
else:
    libvirt.registerErrorHandler(lambda *_a: None, None)

__all__ = ["libvirt"]
