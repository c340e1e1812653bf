"""Where the source checkout is, for the dev-time parts that build from it (hack/, manifests/)."""

from __future__ import annotations

import os
from pathlib import Path

CHECKOUT_ENV = "LIBVIRT_OPERATOR_SOURCE"
# Files that only a clone of the repository has (an installed wheel has none of them).
_MARKERS = ("hack/ensure-controlplane.sh", "hack/controlplane/go.mod", "manifests/examples")


class CheckoutNotFound(RuntimeError):
    """No source checkout: the dev environment cannot build the control plane or find the samples."""


def _is_checkout(path: Path) -> bool:
    return all((path / marker).exists() for marker in _MARKERS)


def find_checkout() -> Path:
    """The repository root: ``$LIBVIRT_OPERATOR_SOURCE``, else the clone this package runs from
    (editable install or PYTHONPATH), else the current directory or one of its parents."""
    given = os.environ.get(CHECKOUT_ENV)
    if given:
        if not _is_checkout(Path(given)):
            raise CheckoutNotFound(f"${CHECKOUT_ENV}={given} is not a libvirt-operator source checkout "
                                   f"(it lacks one of {', '.join(_MARKERS)})")
        return Path(given).resolve()
    here = Path(__file__).resolve()
    cwd = Path.cwd().resolve()
    for candidate in (*here.parents, cwd, *cwd.parents):
        if _is_checkout(candidate):
            return candidate
    raise CheckoutNotFound(
        "the dev environment needs the libvirt-operator source checkout: it builds kube-apiserver and "
        "etcd from hack/controlplane (Go) and creates the samples in manifests/examples/. Run `make run` "
        f"in a clone of the repository, or set ${CHECKOUT_ENV} to one "
        "(prebuilt control plane binaries: $LIBVIRT_OPERATOR_CONTROLPLANE_BIN)")
