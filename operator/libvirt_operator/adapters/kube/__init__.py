"""The Kubernetes adapter: reads (Secrets, lists) and status writes outside kopf's own patching."""

from .client import ConflictError, KubeClient

__all__ = ["ConflictError", "KubeClient"]
