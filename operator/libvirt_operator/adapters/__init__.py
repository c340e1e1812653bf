"""Adapters to the outside world: libvirt, Kubernetes, the knowledge base, HTTP."""
