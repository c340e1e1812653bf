"""ISOImage reconcile helpers without a cluster: progress throttling, when an attempt is due,
the final status patch."""

from __future__ import annotations

import datetime as dt
from typing import Any

from libvirt_operator.core.conditions import timestamp
from libvirt_operator.reconcile.iso import IsoOutcome
from libvirt_operator.reconcile.iso_status import StatusWriter, due, progress_value


class FakeKube:
    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []

    async def patch_status(self, plural: str, namespace: str | None, name: str, status: dict[str, Any]) -> None:
        self.patches.append(status)


class FakeRuntime:
    def __init__(self) -> None:
        self.kube = FakeKube()


async def test_progress_is_patched_at_most_once_per_second(monkeypatch) -> None:
    rt = FakeRuntime()
    writer = StatusWriter(rt, "ns", "img", {})  # type: ignore[arg-type]
    clock = [1000.0]
    monkeypatch.setattr("libvirt_operator.reconcile.iso_status.time.monotonic", lambda: clock[0])
    for i in range(1, 101):  # 100 chunks in 0.99 s
        await writer.progress(i * 10, 1000)
        clock[0] += 0.01
    assert len(rt.kube.patches) == 1
    clock[0] += 0.02
    await writer.progress(1000, 1000)
    assert len(rt.kube.patches) == 2
    await writer.progress(1000, 1000, force=True)  # forced, but nothing changed: no patch
    assert len(rt.kube.patches) == 2
    assert rt.kube.patches[-1] == {"progress": {"bytesDone": 1000, "bytesTotal": 1000, "percent": 100}}


def test_progress_value() -> None:
    assert progress_value(5, None) == {"bytesDone": 5}
    assert progress_value(1, 3) == {"bytesDone": 1, "bytesTotal": 3, "percent": 33}


def test_due() -> None:
    past = timestamp(dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5))
    future = timestamp(dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=60))
    assert due({}, 1, resync_due=False)  # never reconciled
    assert due({"observedGeneration": 1}, 2, resync_due=False)  # spec changed
    ready = {"observedGeneration": 1, "phase": "Ready"}
    assert not due(ready, 1, resync_due=False) and due(ready, 1, resync_due=True)
    err = {"code": "ISO_DOWNLOAD_FAILED"}
    assert due({"observedGeneration": 1, "error": err, "retry": {"count": 1, "nextRetryTime": past}}, 1,
               resync_due=False)
    assert not due({"observedGeneration": 1, "error": err, "retry": {"count": 1, "nextRetryTime": future}}, 1,
                   resync_due=True)
    # permanent (no nextRetryTime): only a spec change starts another attempt
    assert not due({"observedGeneration": 1, "error": err, "retry": {"count": 1}}, 1, resync_due=True)


def test_final_patch_nulls_what_the_reconcile_wrote_but_the_outcome_drops() -> None:
    outcome = IsoOutcome(status={"phase": "Ready", "hosts": []}, error=None, ready=True,
                         written={"phase": "Uploading", "error": {"code": "X"}, "hosts": []})
    assert outcome.final_patch({"retry": {"count": 1}}) == {
        "phase": "Ready", "hosts": [], "error": None, "retry": None}


async def test_retries_back_off_and_stall_after_the_limit() -> None:
    from libvirt_operator.core.conditions import get_condition
    from libvirt_operator.core.errors import AppError, ErrorCode
    from libvirt_operator.core.settings import Settings
    from libvirt_operator.reconcile.iso_status import failed_status

    rt = FakeRuntime()
    rt.settings = Settings(knowledge_base_enabled=False, iso_retry_limit=3)  # type: ignore[attr-defined]
    rt.remediator = None  # type: ignore[attr-defined]
    err = AppError(ErrorCode.ISO_DOWNLOAD_FAILED, "server answered HTTP 503", {"url": "http://m/x.iso"})
    status: dict[str, Any] = {}
    delays = []
    for attempt in (1, 2, 3):
        status = await failed_status(err, status, status.get("conditions") or [], 1, rt, None)  # type: ignore[arg-type]
        assert status["retry"]["count"] == attempt
        at = dt.datetime.strptime(status["retry"]["nextRetryTime"], "%Y-%m-%dT%H:%M:%SZ")
        delays.append((at.replace(tzinfo=dt.timezone.utc) - dt.datetime.now(dt.timezone.utc)).total_seconds())
        stalled = get_condition(status["conditions"], "Stalled")
        reconciling = get_condition(status["conditions"], "Reconciling")
        if attempt < 3:
            assert stalled is None and reconciling["status"] == "True"
        else:  # the limit: Stalled, but still retried at the backoff interval
            assert stalled["status"] == "True" and stalled["reason"] == "ISODownloadFailed" and reconciling is None
    assert delays[0] < delays[1] < delays[2]  # 5 s, 10 s, 20 s (± clock rounding)
    assert status["error"]["code"] == "ISO_DOWNLOAD_FAILED" and status["phase"] == "Failed"

    permanent = AppError(ErrorCode.ISO_DOWNLOAD_FAILED, "refused", {"permanent": "true"})
    status = await failed_status(permanent, {}, [], 1, rt, None)  # type: ignore[arg-type]
    assert "nextRetryTime" not in status["retry"]
    assert get_condition(status["conditions"], "Stalled")["status"] == "True"


def _host(name: str, ready: bool = True, labels: dict | None = None, pool: str = "default") -> dict:
    return {"metadata": {"name": name, "labels": labels or {}},
            "spec": {"uri": "test:///default", "defaultPool": pool},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False",
                                       "reason": "X", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}


class ListingKube(FakeKube):
    def __init__(self, hosts: list[dict]) -> None:
        super().__init__()
        self.hosts = hosts

    async def list_objects(self, plural: str, namespace: str | None = None) -> list[dict]:
        assert plural == "libvirthosts"
        return self.hosts


async def _targets(spec: dict, hosts: list[dict]):
    from libvirt_operator.core.api.iso import ISOImageSpec
    from libvirt_operator.reconcile.iso_targets import resolve_targets

    rt = FakeRuntime()
    rt.kube = ListingKube(hosts)  # type: ignore[assignment]
    return await resolve_targets(ISOImageSpec.model_validate(spec), rt)  # type: ignore[arg-type]


SRC = {"source": {"url": "http://mirror/x.iso"}, "checksum": "sha256:" + "a" * 64}


async def test_default_targets_are_every_ready_host_with_its_default_pool() -> None:
    targets = await _targets(SRC, [_host("b", pool="isos"), _host("a"), _host("down", ready=False)])
    assert [(t.host, t.pool, t.problem) for t in targets] == [("a", "default", None), ("b", "isos", None)]


async def test_spec_pool_overrides_the_hosts_default() -> None:
    targets = await _targets({**SRC, "pool": "media"}, [_host("a", pool="isos")])
    assert targets[0].pool == "media"


async def test_selector_and_names() -> None:
    hosts = [_host("a", labels={"tier": "lab"}), _host("b", labels={"tier": "prod"}),
             _host("c", labels={"tier": "lab"}, ready=False), _host("d")]
    sel = await _targets({**SRC, "targets": {"hostSelector": {"matchLabels": {"tier": "lab"}}}}, hosts)
    assert [t.host for t in sel] == ["a"]
    named = await _targets({**SRC, "targets": {"hostNames": ["b", "c", "zz"]}}, hosts)
    assert [t.host for t in named] == ["b", "c", "zz"]
    assert named[0].problem is None
    assert named[1].problem.code.value == "HOST_UNREACHABLE"  # named but not Ready: waits for it
    assert named[2].problem.code.value == "HOST_NOT_FOUND"


async def test_no_target_is_no_schedulable_host() -> None:
    import pytest

    from libvirt_operator.core.errors import AppError

    with pytest.raises(AppError) as info:
        await _targets(SRC, [_host("down", ready=False)])
    assert info.value.code.value == "NO_SCHEDULABLE_HOST"
