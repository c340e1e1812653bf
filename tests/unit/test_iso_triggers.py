"""The ISOImage controller's triggers and its one work item, without a cluster.

Which watch events queue an image (our own status writes must not: every progress patch would start
another import), a deletion stops the running import, and the work item's retry bookkeeping: the
count is the queue's (a stale status copy does not reset it), a permanent failure is not fetched
again until the spec changes, a new generation starts the backoff over."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from libvirt_operator.core.errors import AppError, ErrorCode
from libvirt_operator.core.settings import Settings
from libvirt_operator.handlers import iso as iso_handlers
from libvirt_operator.handlers import iso_reconcile
from libvirt_operator.handlers.iso import vm_references_changed, watch_iso_images
from libvirt_operator.handlers.iso_state import needs_reconcile, state_of
from libvirt_operator.handlers.teardown import TEARDOWN_FINALIZER
from libvirt_operator.reconcile.iso import IsoOutcome
from libvirt_operator.reconcile.iso_status import failed_status

DELETING = {"deletionTimestamp": "2026-12-03T00:00:00Z"}


def image(generation: int = 1, status: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "virt.libvirt-operator.io/v1alpha1", "kind": "ISOImage",
            "metadata": {"uid": "u1", "name": "img", "namespace": "ns", "generation": generation,
                         "resourceVersion": "1", **meta},
            "spec": {"source": {"url": "http://mirror/x.iso"}}, "status": status or {}}


class FakeKube:
    def __init__(self) -> None:
        self.status_patches: list[dict[str, Any]] = []
        self.removed: list[str] = []

    async def patch_status(self, plural: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.status_patches.append(patch)
        return {}

    async def remove_finalizer(self, plural: str, namespace: str, name: str, finalizer: str,
                             seen: Any = None) -> bool:
        self.removed.append(finalizer)
        return True

    async def ensure_finalizer(self, plural: str, namespace: str, name: str, finalizer: str,
                               known: Any = None) -> dict[str, Any]:
        return {"metadata": {"finalizers": [finalizer], "resourceVersion": "2"}}


class FakeRuntime:
    def __init__(self) -> None:
        self.kube = FakeKube()
        self.extras: dict[str, Any] = {}
        self.settings = Settings(knowledge_base_enabled=False)
        self.remediator = None


@pytest.fixture
def rt(monkeypatch) -> FakeRuntime:
    monkeypatch.setattr(iso_handlers, "_ensure_loops", lambda rt, st: None)  # the test runs the work item
    return FakeRuntime()


async def event(rt: FakeRuntime, obj: dict[str, Any], type: str | None = "MODIFIED") -> None:
    await watch_iso_images(type=type, uid=obj["metadata"]["uid"], body=obj, memo={"runtime": rt}, iso_hosts={})


def queued(rt: FakeRuntime) -> list[str]:
    """The keys due now, taken out of the queue (as its loop would)."""
    return state_of(rt).queue.pop_due()  # type: ignore[arg-type]


def test_first_sight_spec_and_deletion_queue_annotations_and_finalizers_only_while_deleting() -> None:
    assert needs_reconcile(None, image()) == "new"
    assert needs_reconcile(image(1), image(2)) == "spec"
    assert needs_reconcile(image(), image(**DELETING)) == "deletion"
    force = {"virt.libvirt-operator.io/force-release": "true"}
    assert needs_reconcile(image(**DELETING), image(**DELETING, annotations=force)) == "annotations"
    assert needs_reconcile(image(**DELETING, finalizers=["a", "b"]), image(**DELETING, finalizers=["b"])) == "finalizers"
    # Not deleting: someone's annotation or finalizer starts no import.
    assert needs_reconcile(image(), image(annotations={"team": "a"})) is None
    assert needs_reconcile(image(), image(finalizers=[TEARDOWN_FINALIZER])) is None


async def test_our_status_writes_queue_nothing_a_spec_change_does(rt: FakeRuntime) -> None:
    await event(rt, image(), "ADDED")
    assert queued(rt) == ["u1"]
    await event(rt, image(resourceVersion="2", status={"phase": "Downloading", "progress": {"bytesDone": 1}}))
    await event(rt, image(resourceVersion="3", finalizers=[TEARDOWN_FINALIZER]))
    assert queued(rt) == []
    state_of(rt).queue.failed("u1")  # backing off …
    await event(rt, image(2, resourceVersion="4"))
    assert queued(rt) == ["u1"]  # … a new generation is due at once, and its backoff starts over
    assert state_of(rt).queue.attempts("u1") == 0


async def test_a_deletion_stops_the_running_import_and_queues_the_teardown(rt: FakeRuntime) -> None:
    await event(rt, image(), "ADDED")
    queued(rt)
    st = state_of(rt)
    stop = st.stops["u1"] = asyncio.Event()  # as the work item registers its running import
    await event(rt, image(**DELETING, finalizers=[TEARDOWN_FINALIZER]))
    assert stop.is_set() and queued(rt) == ["u1"]


async def test_a_vm_change_queues_its_images_only_while_they_are_being_deleted(rt: FakeRuntime) -> None:
    await event(rt, image(), "ADDED")
    queued(rt)
    vm_references_changed(rt, "ns", ["img", "other"])  # type: ignore[arg-type]
    assert queued(rt) == []  # an import is not started by a VM
    await event(rt, image(**DELETING, finalizers=[TEARDOWN_FINALIZER]))
    queued(rt)
    vm_references_changed(rt, "ns", ["img"])  # type: ignore[arg-type]
    assert queued(rt) == ["u1"]


async def test_retries_are_counted_by_the_queue_and_a_permanent_failure_is_final(rt: FakeRuntime,
                                                                                 monkeypatch) -> None:
    calls: list[dict[str, Any]] = []
    errors = [AppError(ErrorCode.ISO_DOWNLOAD_FAILED, "HTTP 503")] * 2 + [
        AppError(ErrorCode.ISO_CHECKSUM_MISMATCH, "checksum mismatch")] * 2

    async def attempt(namespace, name, uid, generation, spec, status, rt, should_stop, hosts) -> IsoOutcome:
        calls.append(dict(status))
        new = await failed_status(errors[len(calls) - 1], status, [], generation, rt, None)
        return IsoOutcome(new, errors[len(calls) - 1], False, written=dict(status))

    monkeypatch.setattr(iso_reconcile, "reconcile_iso", attempt)
    monkeypatch.setattr("kopf.event", lambda *a, **kw: None)  # no kopf context to post Events in
    st = state_of(rt)  # type: ignore[arg-type]
    await event(rt, image(), "ADDED")
    await iso_reconcile.reconcile_iso_key(rt, st, "u1")
    assert rt.kube.status_patches[-1]["retry"]["count"] == 1 and st.queue.attempts("u1") == 1
    # Someone writes a stale copy (no error, no retry): it queues nothing and resets nothing.
    await event(rt, image(resourceVersion="9", finalizers=[TEARDOWN_FINALIZER], status={"phase": "Downloading"}))
    assert "u1" in st.queue and st.queue.pop_due() == []  # still waiting out its backoff
    await iso_reconcile.reconcile_iso_key(rt, st, "u1")
    assert rt.kube.status_patches[-1]["retry"]["count"] == 2 and st.queue.attempts("u1") == 2
    await iso_reconcile.reconcile_iso_key(rt, st, "u1")  # permanent (checksum mismatch)
    assert "nextRetryTime" not in rt.kube.status_patches[-1]["retry"] and "u1" not in st.queue
    await iso_reconcile.reconcile_iso_key(rt, st, "u1")  # run anyway (e.g. a host change): nothing fetched
    assert len(calls) == 3
    await event(rt, image(2, resourceVersion="10", finalizers=[TEARDOWN_FINALIZER]))  # a spec change
    await iso_reconcile.reconcile_iso_key(rt, st, "u1")
    assert len(calls) == 4 and rt.kube.status_patches[-1]["retry"]["count"] == 1  # the count started over


def test_a_host_change_concerns_ready_images_and_those_waiting_for_that_host() -> None:
    from libvirt_operator.handlers.iso_state import waits_for

    named = {"spec": {"targets": {"hostNames": ["hv-1"]}}}
    assert waits_for(named, None, set())  # Ready: a new target may have come
    assert waits_for(named, ErrorCode.NO_SCHEDULABLE_HOST, set())
    assert not waits_for(named, ErrorCode.HOST_UNREACHABLE, set())  # a probe of a dead host: keep backing off
    assert not waits_for(named, ErrorCode.HOST_UNREACHABLE, {"hv-2"})
    assert waits_for(named, ErrorCode.HOST_UNREACHABLE, {"hv-1"})  # its host is Ready now: at once
    assert not waits_for(named, ErrorCode.ISO_CHECKSUM_MISMATCH, {"hv-1"})


async def test_operator_exit_stops_a_running_import_before_the_queue_goes(monkeypatch) -> None:
    rt = FakeRuntime()
    stopped = asyncio.Event()

    async def long_import(namespace, name, uid, generation, spec, status, rt, should_stop, hosts) -> IsoOutcome:
        while not should_stop():  # as the downloader and the uploads check it
            await asyncio.sleep(0.01)
        stopped.set()
        return IsoOutcome(dict(status), None, False, aborted=True, written=dict(status))

    monkeypatch.setattr(iso_reconcile, "reconcile_iso", long_import)
    await event(rt, image(), "ADDED")  # starts the queue's loop, which runs the import
    st = state_of(rt)  # type: ignore[arg-type]
    for _ in range(200):
        if "u1" in st.stops:
            break
        await asyncio.sleep(0.01)
    assert "u1" in st.stops, "the import never started"
    await iso_handlers.stop_iso_queue(memo={"runtime": rt})
    assert stopped.is_set()  # it stopped by itself (its partial files go), not just cancelled
    assert st.queue_task is not None and st.queue_task.done()


async def test_a_deletion_blocked_by_a_vm_waits_for_that_vm_then_releases_the_image(rt: FakeRuntime,
                                                                                    monkeypatch) -> None:
    users = ["installer"]

    async def delete_iso(namespace, name, uid, status, rt, *, force=False) -> None:
        if users:
            raise AppError(ErrorCode.ISO_IN_USE, f"ISOImage {name} is used by VirtualMachine {users[0]}")

    monkeypatch.setattr(iso_reconcile, "delete_iso", delete_iso)
    events: list[str] = []
    monkeypatch.setattr("kopf.event", lambda obj, **kw: events.append(kw["reason"]))
    st = state_of(rt)  # type: ignore[arg-type]
    await event(rt, image(**DELETING, finalizers=[TEARDOWN_FINALIZER]), "ADDED")
    assert queued(rt) == ["u1"]
    await iso_reconcile.reconcile_iso_key(rt, st, "u1")
    await iso_reconcile.reconcile_iso_key(rt, st, "u1")  # still blocked: no second write, no second Event
    assert rt.kube.status_patches == [rt.kube.status_patches[0]] and len(events) == 1
    assert rt.kube.status_patches[0]["phase"] == "Deleting" and rt.kube.removed == []
    assert queued(rt) == []  # not retried in a loop while the VM stays …
    users.clear()
    vm_references_changed(rt, "ns", ["img"])  # type: ignore[arg-type]
    assert queued(rt) == ["u1"]  # … but at once when it goes
    await iso_reconcile.reconcile_iso_key(rt, st, "u1")
    assert rt.kube.removed == [TEARDOWN_FINALIZER]
