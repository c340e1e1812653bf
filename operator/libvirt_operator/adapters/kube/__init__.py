"""The Kubernetes adapter: reads (Secrets, lists) and status writes outside kopf's own patching."""

from .client import KubeClient

__all__ = ["KubeClient"]
