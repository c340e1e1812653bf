"""The VM controller's watch cache keeps the answers of the operator's own writes until the watch
catches up with them (handlers.watch_copies.from_watch, VmState.remember)."""

from __future__ import annotations

import asyncio
import types
from typing import Any

from libvirt_operator.handlers.vm_apply import apply_outcome
from libvirt_operator.handlers.vm_state import VmState
from libvirt_operator.handlers.watch_copies import from_watch, older
from libvirt_operator.reconcile.vm_types import VmOutcome


def obj(rv: str, status: dict[str, Any] | None = None, finalizers: list[str] | None = None,
        **meta: Any) -> dict[str, Any]:
    m = {"uid": "u", "namespace": "ns", "name": "vm", "resourceVersion": rv, **meta}
    if finalizers is not None:
        m["finalizers"] = finalizers
    return {"metadata": m, "spec": {"cpu": 1}, "status": status or {}}


def test_an_event_older_than_our_write_keeps_what_the_write_set_and_takes_the_rest() -> None:
    cached = obj("120", {"host": "a", "printableStatus": "Running"}, ["ours"])
    late = obj("117", {}, [], annotations={"a": "b"}, deletionTimestamp="2026-01-01T00:00:00Z")
    vm = from_watch(late, cached)
    assert vm["status"] == {"host": "a", "printableStatus": "Running"}
    assert vm["metadata"]["resourceVersion"] == "120" and vm["metadata"]["finalizers"] == ["ours"]
    assert vm["metadata"]["annotations"] == {"a": "b"} and vm["metadata"]["deletionTimestamp"]


def test_a_newer_or_uncomparable_event_wins_whole() -> None:
    cached = obj("120", {"host": "a"}, ["ours"])
    for event in (obj("121", {"host": "b"}, []), obj("120", {"host": "b"}, []), obj("opaque", {"host": "b"}, [])):
        vm = from_watch(event, cached)
        assert vm["status"] == {"host": "b"} and vm["metadata"]["finalizers"] == []
    assert from_watch(obj("5", {"host": "b"}), None)["status"] == {"host": "b"}
    assert not older(obj("9"), obj("10a")) and not older(obj("10"), obj("9")) and older(obj("9"), obj("10"))


def test_a_write_answer_older_than_the_cache_is_not_remembered() -> None:
    st = VmState()
    st.vms["u"] = obj("130", {"host": "a", "printableStatus": "Stopped"})
    st.remember(obj("125", {"host": "a", "printableStatus": "Running"}))
    assert st.vms["u"]["status"]["printableStatus"] == "Stopped"
    st.remember(obj("131", {"host": "a", "printableStatus": "Running"}))
    assert st.vms["u"]["status"]["printableStatus"] == "Running" and st.vms["u"]["metadata"]["resourceVersion"] == "131"


class AnsweringKube:
    """patch_status answers like the API server: the stored status merged with the patch, a new resourceVersion."""

    def __init__(self, stored: dict[str, Any]) -> None:
        self.stored = stored

    async def patch_status(self, plural: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        status = {**self.stored["status"], **patch}
        self.stored = obj(str(int(self.stored["metadata"]["resourceVersion"]) + 1),
                          {k: v for k, v in status.items() if v is not None})
        return self.stored


def test_a_run_caches_what_the_server_holds_after_its_write_not_only_what_the_run_computed() -> None:
    """A reconcile's status write answers with the whole status, which may hold what another writer put
    there after the run read the VM (here: a host it must still clean, staleDomainHosts). The cache keeps
    the answer, so the host round that removes stale copies sees that host; caching the run's own status
    instead lost it until the VM's next watch event (none comes when the watch delivered this write
    before its answer), and the copy stayed on that host."""
    st = VmState()
    read = obj("200", {"host": "b", "printableStatus": "Paused"})
    st.vms["u"] = read
    kube = AnsweringKube(obj("201", {"host": "b", "printableStatus": "Paused", "staleDomainHosts": ["a"]}))
    rt = types.SimpleNamespace(kube=kube)
    asyncio.run(apply_outcome(rt, st, read, VmOutcome(status={"host": "b", "printableStatus": "Running"},
                                                      events=[])))
    assert st.vms["u"]["status"] == {"host": "b", "printableStatus": "Running", "staleDomainHosts": ["a"]}
    assert st.vms["u"]["metadata"]["resourceVersion"] == "202"
    assert st.stale_on["a"] == {"u"} and st.on_host["b"] == {"u"}
