"""The libvirt adapter: pooled per-host connections, blocking calls run off the event loop."""

from .connection import HostConnection, HostPool, ConnectOptions
from .errors import classify_libvirt_error

__all__ = ["HostConnection", "HostPool", "ConnectOptions", "classify_libvirt_error"]
