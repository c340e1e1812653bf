"""Pure planning of a VM's cloud-init NoCloud seed: which files, and the volume that holds them.

No I/O (the Secret is read and the ISO built/uploaded by the caller). The seed volume is named
``lvop-<vm uid>--cidata-<digest>``: it carries the VM's uid, so deletion (adapters.libvirt.domains
.teardown, which deletes every ``lvop-<uid>-`` volume) removes it with the VM, and what follows the
prefix starts with a dash, which no disk name (a DNS label) does, so it never collides with a disk's
volume ``lvop-<uid>-<disk>``. The digest
covers the files' content: new content is a new volume, hence a new cdrom path, a new domain
definition and, while the VM runs, RestartRequired like any other change that needs a reboot.
"""

from __future__ import annotations

import dataclasses
import hashlib

from ..core.domain import owned_volume_prefix

SEED_LABEL = "cidata"
SEED_DISK = "cloudInit"  # the seed's name in status.volumes and its cdrom alias (never a spec disk name)
_SEED_MARK = "-cidata-"
DIGEST_CHARS = 16
# A Secret may hold up to 1 MiB; a seed is not the place for more than this.
MAX_SECRET_USER_DATA = 256 * 1024


@dataclasses.dataclass(frozen=True)
class SeedPlan:
    files: tuple[tuple[str, bytes], ...]   # (file name on the cidata ISO, content), in this order
    digest: str
    volume: str

    def file(self, name: str) -> bytes | None:
        return next((data for n, data in self.files if n == name), None)


def meta_data(uid: str, name: str) -> bytes:
    """NoCloud meta-data: the instance id is the VM's uid (cloud-init's per-instance modules run once
    per VirtualMachine, again only for a new object), the hostname its name."""
    return f"instance-id: {uid}\nlocal-hostname: {name}\n".encode()


def seed_digest(uid: str, files: tuple[tuple[str, bytes], ...]) -> str:
    """Content digest, salted with the uid (a bare hash of user data that came from a Secret would let
    whoever reads status test guesses of it against the volume name)."""
    h = hashlib.sha256(f"lvop-seed-v1\0{uid}\0".encode())
    for name, data in files:
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:DIGEST_CHARS]


def seed_volume_name(uid: str, digest: str) -> str:
    return f"{owned_volume_prefix(uid)}{_SEED_MARK}{digest}"


def is_seed_volume(uid: str, volume: str) -> bool:
    """Whether `volume` is one of this VM's seed volumes (any content)."""
    prefix = owned_volume_prefix(uid) + _SEED_MARK
    rest = volume[len(prefix):]
    return volume.startswith(prefix) and len(rest) == DIGEST_CHARS and all(c in "0123456789abcdef" for c in rest)


def plan_seed(uid: str, name: str, user_data: bytes | None, network_config: bytes | None) -> SeedPlan:
    """The seed's files: user-data (empty when none is given: NoCloud needs the file), meta-data, and
    network-config when given."""
    files: list[tuple[str, bytes]] = [("user-data", user_data or b""), ("meta-data", meta_data(uid, name))]
    if network_config is not None:
        files.append(("network-config", network_config))
    frozen = tuple(files)
    digest = seed_digest(uid, frozen)
    return SeedPlan(frozen, digest, seed_volume_name(uid, digest))
