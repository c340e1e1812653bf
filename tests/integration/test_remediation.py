"""An SRE's view: a failing resource carries a code, a sentence and runbook links from the knowledge
base (the session operator runs with it, as in production); all of it clears once healthy."""

from __future__ import annotations

import uuid

from tests.harness.kube import condition


def test_failure_shows_code_sentence_and_runbooks_then_clears(kube, operator, test_host_factory) -> None:
    name = f"remedy-{uuid.uuid4().hex[:6]}"
    kube.create("libvirthosts", {"metadata": {"name": name},
                                 "spec": {"uri": "qemu+tcp://127.0.0.1:1/system", "insecure": True,
                                          "probeIntervalSeconds": 5}})
    first = kube.wait_for(lambda: ((kube.get("libvirthosts", name) or {}).get("status") or {}).get("error"),
                          timeout=30, what="status.error")
    assert first["remediation"], "a link is there from the first failure on (fixed link while the model loads)"

    def ranked():
        h = kube.get("libvirthosts", name)
        links = (((h or {}).get("status") or {}).get("error") or {}).get("remediation") or []
        return h if links and links[0]["score"] > 0 else None
    host = kube.wait_for(ranked, timeout=90, what="ranked remediation from the knowledge base")
    error = host["status"]["error"]
    assert error["code"] == "HOST_UNREACHABLE"
    assert error["context"]["host"] == name
    assert error["since"] == first["since"], "since stays while the same error persists"
    top = error["remediation"][0]
    # From the knowledge base, not the fixed fallback link: a relevance score, and the section of
    # the runbook for this cause (the port is closed), not the runbook as a whole.
    assert top["url"].endswith("/runbooks/host-unreachable.md#connection-refused")
    assert len(error["remediation"]) == 3 and all(set(r) == {"title", "url", "score"} for r in error["remediation"])
    assert top["score"] > 0  # the fixed fallback link scores 0
    ready = condition(host, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "HostUnreachable"
    assert ready["message"].startswith("[HOST_UNREACHABLE]") and ready["message"].endswith(top["url"])
    events = kube.core.list_event_for_all_namespaces(field_selector=f"involvedObject.name={name}").items
    # The Event is posted on the transition, with the link known then (the fixed one if the
    # knowledge base was still loading): the same runbook.
    assert any("HOST_UNREACHABLE" in e.message and top["url"].split("#")[0] in e.message for e in events)

    kube.patch("libvirthosts", name, {"spec": {"uri": test_host_factory(name), "insecure": False}})
    healed = kube.wait_condition("libvirthosts", name, "Ready", "True", timeout=30)
    assert "error" not in healed["status"]
    assert condition(healed, "Reconciling") is None and condition(healed, "Stalled") is None
    assert condition(healed, "Reachable")["status"] == "True"
    kube.delete("libvirthosts", name)


def test_knowledge_base_health_is_reported(operator) -> None:
    kb = operator.runtime.remediator
    assert kb is not None
    operator.call(kb.warm_up, timeout=120)
    assert kb.healthy, kb.last_error
