"""Logs are structured and bound to the resource; secrets never reach them; the CLI documents itself."""

from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner

from libvirt_operator.cli import main
from libvirt_operator.core.errors import AppError, ErrorCode, redact
from libvirt_operator.core.logs import configure


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_logs_carry_the_resource_of_kopf_records(capsys, restore_logging) -> None:
    configure("json", "INFO")
    logger = logging.getLogger("kopf.objects")
    logger.info("Handler succeeded", extra={"k8s_ref": {"kind": "VirtualMachine", "namespace": "prod", "name": "db"}})
    line = capsys.readouterr().err.strip().splitlines()[-1]
    record = json.loads(line)
    assert record["event"] == "Handler succeeded"
    assert (record["kind"], record["namespace"], record["name"]) == ("VirtualMachine", "prod", "db")
    assert record["level"] == "info" and "timestamp" in record


def test_routine_kopf_successes_are_not_logged_at_info(capsys, restore_logging) -> None:
    configure("json", "INFO")
    logger = logging.getLogger("kopf.objects")
    logger.info("Timer 'probe_host' succeeded.")
    logger.info("Handler 'watch_vms' succeeded.")
    logger.info("Handler 'reconcile_vm' succeeded.")
    lines = [json.loads(line)["event"] for line in capsys.readouterr().err.strip().splitlines()]
    assert lines == ["Handler 'reconcile_vm' succeeded."]


def test_app_errors_strip_credentials_from_messages_and_context() -> None:
    err = AppError(ErrorCode.ISO_DOWNLOAD_FAILED, "GET https://user:hunter2@mirror.invalid/x.iso failed",
                   context={"url": "https://user:hunter2@mirror.invalid/x.iso", "authorization": "Bearer abc"})
    assert "hunter2" not in err.message and "hunter2" not in json.dumps(err.context)
    assert "authorization" not in err.context
    assert redact("qemu+ssh://root:pw@host/system") == "qemu+ssh://***@host/system"


@pytest.mark.parametrize("command", [[], ["run"], ["crds"], ["dev"]])
def test_every_command_has_help(command) -> None:
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_run_help_lists_the_operational_options() -> None:
    out = CliRunner().invoke(main, ["run", "--help"]).output
    for option in ("--namespace", "--metrics-port", "--liveness-port", "--log-format"):
        assert option in out


def test_crds_command_prints_every_crd() -> None:
    out = CliRunner().invoke(main, ["crds"]).output
    assert out.count("kind: CustomResourceDefinition") == 6
