"""Orphan detection is conservative: only owned domains, and only after two sightings."""

from libvirt_operator.core.domain import Owner
from libvirt_operator.adapters.libvirt.domain_xml import DomainMetadata
from libvirt_operator.reconcile import orphans


def test_only_owned_domains_seen_twice_are_orphans() -> None:
    owned = DomainMetadata(Owner("prod", "db", "u1"), None)
    foreign = DomainMetadata(None, None)
    candidates = {"u1": owned, "u2": foreign}
    assert orphans.unaccounted({"u1", "u2", "vm"}, {"vm"}) == {"u1", "u2"}
    assert orphans.confirmed_orphans(candidates, previous=set()) == set()  # first sighting: wait
    assert orphans.confirmed_orphans(candidates, previous={"u1", "u2"}) == {"u1"}
    assert orphans.orphan_status(candidates, {"u1"}) == [{"uuid": "u1", "namespace": "prod", "name": "db"}]
