"""kopf handler registration: the thin layer between kopf events and reconcile.

Importing this package registers every handler with kopf's default registry.
"""

from . import addresses, host, iso, kube_metrics, migration, namespaces, snapshot, restore, startup, vm  # noqa: F401  (registration side effects)
