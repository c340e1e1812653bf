"""status.error is complete even without the knowledge base: a fixed runbook link per code."""

from __future__ import annotations

from libvirt_operator.adapters.rag import FixedLinks, KnowledgeBase
from libvirt_operator.core.errors import AppError, ErrorCode
from libvirt_operator.reconcile.failures import error_status, human_message


async def test_fixed_links_fill_status_error_and_the_condition_message() -> None:
    err = AppError(ErrorCode.STORAGE_FULL, "cannot allocate 10 GiB in pool default", {"pool": "default"})
    status = await error_status(err, None, "VirtualMachine", FixedLinks("https://mirror.example/rag/"))
    assert status["code"] == "STORAGE_FULL" and status["context"] == {"pool": "default"}
    assert status["remediation"][0]["url"] == "https://mirror.example/rag/runbooks/storage-full.md"
    message = human_message(err, status)
    assert message.startswith("[STORAGE_FULL] cannot allocate") and message.endswith("runbooks/storage-full.md")


async def test_since_is_kept_while_the_same_error_persists() -> None:
    err = AppError(ErrorCode.HOST_UNREACHABLE, "connection refused")
    first = await error_status(err, None, "LibvirtHost", FixedLinks())
    again = await error_status(err, {**first, "since": "2020-01-01T00:00:00Z"}, "LibvirtHost", FixedLinks())
    assert again["since"] == "2020-01-01T00:00:00Z"
    other = await error_status(AppError(ErrorCode.HOST_AUTH_FAILED, "denied"), first, "LibvirtHost", FixedLinks())
    assert other["since"] != "2020-01-01T00:00:00Z"


async def test_a_loading_knowledge_base_answers_with_the_fixed_link_at_once(tmp_path) -> None:
    kb = KnowledgeBase(tmp_path / "db")
    kb._loading = True  # a warm-up is loading the model in its thread
    links = await kb.remediation(ErrorCode.ISO_IN_USE, "image is used by vm a")
    assert [link.url.rsplit("/", 2)[-2:] for link in links] == [["runbooks", "iso-in-use.md"]]
    assert links[0].score == 0.0
