"""VM action requests: parsing the annotation, once-per-id, and what each action does per runStrategy
and power state (reconcile.actions, pure)."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from libvirt_operator.core.domain import PowerState
from libvirt_operator.reconcile import actions
from libvirt_operator.reconcile.actions import (
    ACTION_REQUEST_ANNOTATION as ANN, ActionRequest, BadRequest, Step, plan_action,
)

RUN, OFF, PAUSED, CRASHED, DOWNING = (PowerState.RUNNING, PowerState.SHUTOFF, PowerState.PAUSED,
                                      PowerState.CRASHED, PowerState.SHUTTING_DOWN)
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


def req(**fields) -> str:
    return json.dumps({"action": "restart", "id": "a1", **fields})


def test_a_well_formed_request_is_parsed():
    parsed = actions.parse_request(req(requestedBy="alice", requestedAt="2026-01-02T03:04:05Z"))
    assert parsed == ActionRequest("a1", "restart", "alice", "2026-01-02T03:04:05Z")


@pytest.mark.parametrize("raw, words", [
    ("{not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"action": "restart"}), '"id"'),
    (json.dumps({"action": "restart", "id": ""}), '"id"'),
    (json.dumps({"action": "explode", "id": "x"}), "unknown action 'explode'"),
    (json.dumps({"id": "x"}), "needs an \"action\""),
    ("x" * 5000, "longer than"),
])
def test_bad_requests_are_reported_with_a_stable_id_and_a_clear_message(raw, words):
    parsed = actions.parse_request(raw)
    assert isinstance(parsed, BadRequest) and words in parsed.message
    assert actions.parse_request(raw).id == parsed.id  # the same bad annotation is reported once


def test_no_annotation_means_no_request():
    assert actions.parse_request(None) is None and actions.parse_request("  ") is None
    assert actions.pending_request({}, None) is None
    assert actions.pending_request({"other": "x"}, None) is None


def test_a_request_is_executed_once_per_id_whatever_its_outcome():
    ann = {ANN: req()}
    assert actions.pending_request(ann, None) == ActionRequest("a1", "restart")
    assert actions.pending_request(ann, {"id": "a0", "phase": "Succeeded"}) is not None  # an older one
    assert actions.pending_request(ann, {"id": "a1", "phase": "Pending"}) is not None    # interrupted: finish it
    assert actions.pending_request(ann, {"id": "a1", "phase": "Succeeded"}) is None
    assert actions.pending_request(ann, {"id": "a1", "phase": "Failed"}) is None
    bad = {ANN: "{oops"}
    first = actions.pending_request(bad, None)
    assert isinstance(first, BadRequest)
    assert actions.pending_request(bad, actions.last_action(first, "Failed", first.message, NOW)) is None


STRATEGIES = ["Always", "RerunOnFailure", "Manual", "Once", "Halted"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_start(strategy):
    if strategy == "Halted":
        p = plan_action("start", strategy, OFF)
        assert p.refused and "Halted" in p.message and "Git" in p.message and p.steps == ()
        return
    assert plan_action("start", strategy, OFF).steps == (Step.START,)
    assert plan_action("start", strategy, PowerState.ABSENT).steps == (Step.START,)
    assert plan_action("start", strategy, CRASHED).steps == (Step.DESTROY, Step.START)
    running = plan_action("start", strategy, RUN)
    assert running.phase == "Succeeded" and running.steps == () and "already running" in running.message
    assert plan_action("start", strategy, PAUSED).refused  # unpause is the way


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stop(strategy):
    if strategy == "Always":
        p = plan_action("stop", strategy, RUN)
        assert p.refused and "runStrategy to Halted" in p.message and "Git" in p.message and p.steps == ()
        return
    assert plan_action("stop", strategy, RUN).steps == (Step.SHUTDOWN,)
    assert plan_action("stop", strategy, DOWNING).steps == (Step.SHUTDOWN,)
    assert plan_action("stop", strategy, PAUSED).steps == (Step.DESTROY,)  # a paused guest cannot shut down
    off = plan_action("stop", strategy, OFF)
    assert off.phase == "Succeeded" and off.steps == ()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_restart(strategy):
    if strategy == "Halted":
        assert plan_action("restart", strategy, OFF).refused
        return
    assert plan_action("restart", strategy, RUN).steps == (Step.SHUTDOWN, Step.START)  # a fresh boot
    assert plan_action("restart", strategy, PAUSED).steps == (Step.DESTROY, Step.START)
    stopped = plan_action("restart", strategy, OFF)
    assert stopped.refused and "use start" in stopped.message


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pause_and_unpause(strategy):
    assert plan_action("pause", strategy, RUN).steps == (Step.SUSPEND,)
    assert plan_action("pause", strategy, PAUSED).steps == () and not plan_action("pause", strategy, PAUSED).refused
    assert plan_action("pause", strategy, OFF).refused
    assert plan_action("unpause", strategy, PAUSED).steps == (Step.RESUME,)
    assert plan_action("unpause", strategy, RUN).steps == () and not plan_action("unpause", strategy, RUN).refused
    assert plan_action("unpause", strategy, OFF).refused


def test_unknown_state_refuses_every_action():
    for action in ("start", "stop", "restart", "pause", "unpause"):
        assert plan_action(action, "Manual", PowerState.UNKNOWN).refused


def test_only_a_rerun_on_failure_vm_stopped_on_request_is_held_stopped():
    stop_ok = {"id": "x", "action": "stop", "phase": "Succeeded"}
    assert actions.held_stopped("RerunOnFailure", stop_ok, OFF)
    assert not actions.held_stopped("RerunOnFailure", stop_ok, RUN)  # started by hand since: not held
    assert not actions.held_stopped("RerunOnFailure", {**stop_ok, "phase": "Failed"}, OFF)
    assert not actions.held_stopped("RerunOnFailure", {**stop_ok, "action": "start"}, OFF)
    assert not actions.held_stopped("Always", stop_ok, OFF)  # the spec wins once it says Always
    assert not actions.held_stopped("RerunOnFailure", None, OFF)


def test_last_action_and_new_request_wire_forms():
    la = actions.last_action(ActionRequest("i", "pause", "bob"), "Succeeded", "paused", NOW)
    assert la == {"id": "i", "action": "pause", "phase": "Succeeded", "message": "paused",
                  "requestedBy": "bob", "time": "2026-01-02T03:04:05Z"}
    value = json.loads(actions.new_request("stop", "id-1", "bob", NOW))
    assert value == {"action": "stop", "id": "id-1", "requestedAt": "2026-01-02T03:04:05Z", "requestedBy": "bob"}
    assert actions.parse_request(actions.new_request("stop", "id-1", None, NOW)) == ActionRequest(
        "id-1", "stop", None, "2026-01-02T03:04:05Z")


def test_cli_commands_exist_for_both_entry_points_and_need_a_namespaced_name():
    from click.testing import CliRunner

    from libvirt_operator.cli import main
    from libvirt_operator.cli.vm_actions import kubectl_plugin

    runner = CliRunner()
    for group, prefix in ((main, ["vm"]), (kubectl_plugin, ["vm"])):
        out = runner.invoke(group, [*prefix, "--help"])
        assert out.exit_code == 0
        assert all(a in out.output for a in ("start", "stop", "restart", "pause", "unpause"))
    bad = runner.invoke(main, ["vm", "restart", "just-a-name"])
    assert bad.exit_code == 2 and "<namespace>/<name>" in bad.output
