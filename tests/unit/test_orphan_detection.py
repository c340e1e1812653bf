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


def test_a_namespaced_instance_judges_only_domains_of_its_namespaces() -> None:
    """With --namespace team-a, VMs of team-b are invisible: their domains are not this instance's orphans."""
    from libvirt_operator.reconcile.tenancy import watched

    owns = watched(("team-a",))
    candidates = {"a1": DomainMetadata(Owner("team-a", "db", "a1"), None),
                  "b1": DomainMetadata(Owner("team-b", "web", "b1"), None),
                  "f": DomainMetadata(None, None)}
    mine = orphans.own_candidates(candidates, owns)
    assert set(mine) == {"a1", "f"}
    assert orphans.confirmed_orphans(mine, previous={"a1", "b1", "f"}) == {"a1"}


def test_namespace_patterns_follow_kopf() -> None:
    from kopf._cogs.structs.references import match_namespace

    from libvirt_operator.reconcile.tenancy import watched

    assert watched(())("anything")
    for patterns in (("team-*",), ("team-*,!team-b",), ("!kube-*",), ("prod", "team-?")):
        owns = watched(patterns)
        for ns in ("team-a", "team-b", "prod", "kube-system", "other"):
            assert owns(ns) == any(match_namespace(ns, p) for p in patterns), (patterns, ns)


def test_merging_keeps_the_entries_of_other_instances() -> None:
    """Two instances with disjoint namespaces: each replaces only its own entries."""
    from libvirt_operator.reconcile.tenancy import watched

    a, b = watched(("team-a",)), watched(("team-b",))
    current = [{"uuid": "b1", "namespace": "team-b", "name": "web"},
               {"uuid": "a-old", "namespace": "team-a", "name": "gone"}]
    after_a = orphans.merge_entries(current, [{"uuid": "a1", "namespace": "team-a", "name": "db"}], a)
    assert after_a == [{"uuid": "a1", "namespace": "team-a", "name": "db"},
                       {"uuid": "b1", "namespace": "team-b", "name": "web"}]
    assert orphans.own_entries(after_a, a) == [{"uuid": "a1", "namespace": "team-a", "name": "db"}]
    after_b = orphans.merge_entries(after_a, [], b)  # b's orphan was cleaned up
    assert after_b == [{"uuid": "a1", "namespace": "team-a", "name": "db"}]
    # a cluster-wide instance owns every entry
    assert orphans.merge_entries(after_a, [], watched(())) == []
