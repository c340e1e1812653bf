"""core.classify: text rules over realistic libvirt / QEMU / HTTP / Kubernetes errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from libvirt_operator.core.classify import (
    LIBVIRT_AMBIGUOUS,
    LIBVIRT_DEFINITIVE,
    RULES,
    classify_libvirt,
    classify_text,
    explicit_code,
    libvirt_error_names,
    match_rule,
)
from libvirt_operator.core.errors import CATALOG, ErrorCode

EVAL = Path(__file__).resolve().parents[1] / "data" / "error_eval.yaml"


def _eval_set() -> list[dict[str, str]]:
    return yaml.safe_load(EVAL.read_text())


def test_eval_set_is_big_and_covers_the_catalog() -> None:
    data = _eval_set()
    assert len(data) >= 45
    counts = Counter(ErrorCode(d["code"]) for d in data)  # also validates every code
    missing = set(CATALOG) - set(counts)
    assert not missing, f"codes without an eval example: {sorted(c.value for c in missing)}"


def test_accuracy_on_eval_set() -> None:
    data = _eval_set()
    wrong = [(d["code"], classify_text(d["text"]).value, d["text"][:100])
             for d in data if classify_text(d["text"]).value != d["code"]]
    accuracy = 1 - len(wrong) / len(data)
    assert accuracy >= 0.90, f"accuracy {accuracy:.2%}; misclassified: {wrong}"


def test_every_code_is_reachable() -> None:
    """Each catalog code is produced correctly for at least one eval example."""
    correct = {ErrorCode(d["code"]) for d in _eval_set() if classify_text(d["text"]).value == d["code"]}
    assert correct == set(CATALOG)


@pytest.mark.parametrize(("text", "code"), [
    # an SSH auth failure also says "Connection reset by peer": auth wins
    ("Cannot recv data: root@h: Permission denied (publickey).: Connection reset by peer",
     ErrorCode.HOST_AUTH_FAILED),
    # "Permission denied" on /dev/kvm is a host capability problem, not storage
    ("qemu-system-x86_64: Could not access KVM kernel module: Permission denied", ErrorCode.HYPERVISOR_UNSUPPORTED),
    # a QEMU start failure explained by memory is a resource problem, not a crash
    ("internal error: process exited while connecting to monitor: cannot set up guest memory 'pc.ram': "
     "Cannot allocate memory", ErrorCode.INSUFFICIENT_RESOURCES),
    # ... while an OOM-killed QEMU is a crash
    ("Out of memory: Killed process 1234 (qemu-system-x86) total-vm:1kB", ErrorCode.DOMAIN_CRASHED),
    # etcd timeouts are Kubernetes, not libvirt timeouts
    ("(504) Reason: Gateway Timeout: etcdserver: request timed out", ErrorCode.KUBERNETES_API_ERROR),
    # a missing Secret via the API is a credentials problem
    ('(404) Reason: Not Found: secrets "h1-ssh" not found', ErrorCode.CREDENTIALS_NOT_FOUND),
    ("Storage volume not found: no storage vol with matching name 'x.iso'", ErrorCode.ISO_NOT_FOUND),
    ("httpx.ReadTimeout: The read operation timed out", ErrorCode.ISO_DOWNLOAD_FAILED),
])
def test_precedence(text: str, code: ErrorCode) -> None:
    assert classify_text(text) == code


def test_fallbacks() -> None:
    assert classify_text("") == ErrorCode.LIBVIRT_ERROR
    assert classify_text("internal error: something nobody has seen before") == ErrorCode.LIBVIRT_ERROR
    assert classify_text("kopf: handler failed with an unexpected status") == ErrorCode.KUBERNETES_API_ERROR
    assert classify_text("GET https://example.org/a.iso returned HTTP 418") == ErrorCode.ISO_DOWNLOAD_FAILED
    assert classify_text("¯\\_(ツ)_/¯", default=ErrorCode.INVALID_SPEC) == ErrorCode.INVALID_SPEC


def test_rules_are_ordered_and_named() -> None:
    names = [r.name for r in RULES]
    assert len(names) == len(set(names))
    assert match_rule("Domain not found: no domain with matching name 'x'").name == "domain-missing"  # type: ignore[union-attr]
    assert match_rule("nothing to see") is None


def test_libvirt_names_exist_and_classify() -> None:
    libvirt = pytest.importorskip("libvirt")
    names = libvirt_error_names(libvirt)
    assert names[libvirt.VIR_ERR_NO_DOMAIN] == "VIR_ERR_NO_DOMAIN"
    assert names[libvirt.VIR_ERR_INTERNAL_ERROR] == "VIR_ERR_INTERNAL_ERROR"  # not the level VIR_ERR_WARNING
    for name in (*LIBVIRT_DEFINITIVE, *LIBVIRT_AMBIGUOUS):
        assert hasattr(libvirt, name), name
    assert classify_libvirt("VIR_ERR_NO_DOMAIN", "whatever") == ErrorCode.VM_NOT_FOUND
    assert classify_libvirt("VIR_ERR_INTERNAL_ERROR",
                            "internal error: qemu unexpectedly closed the monitor: "
                            "Could not open '/srv/a.qcow2': Permission denied") == ErrorCode.STORAGE_PERMISSION_DENIED
    assert classify_libvirt("VIR_ERR_CONFIG_UNSUPPORTED", "unsupported configuration: odd") == ErrorCode.INVALID_SPEC
    assert classify_libvirt("VIR_ERR_INVALID_ARG",
                            "invalid argument: could not find capabilities for domaintype=kvm"
                            ) == ErrorCode.HYPERVISOR_UNSUPPORTED
    assert classify_libvirt(None, "no idea") == ErrorCode.LIBVIRT_ERROR


@pytest.mark.parametrize(("text", "code"), [
    ("ISO_CHECKSUM_MISMATCH", ErrorCode.ISO_CHECKSUM_MISMATCH),  # the bare code from `describe`
    (" iso-checksum-mismatch\n", ErrorCode.ISO_CHECKSUM_MISMATCH),
    ("HostUnreachable", ErrorCode.HOST_UNREACHABLE),  # a condition reason
    ("Reason: ChecksumMismatch", ErrorCode.ISO_CHECKSUM_MISMATCH),
    ("[STORAGE_FULL] cannot allocate 5 bytes: No space left on device. See https://x/storage-full.md",
     ErrorCode.STORAGE_FULL),
    ("Warning  Failed  12s  libvirt-operator  [HOST_AUTH_FAILED] authentication failed",
     ErrorCode.HOST_AUTH_FAILED),  # an Event line
    ("    Code:     INSUFFICIENT_RESOURCES", ErrorCode.INSUFFICIENT_RESOURCES),  # describe's status.error
    # a named code beats the rules that the rest of the message would match
    ("[INVALID_SPEC] Network not found: no network with matching name 'x'", ErrorCode.INVALID_SPEC),
])
def test_texts_naming_their_code(text: str, code: ErrorCode) -> None:
    assert explicit_code(text) == code
    assert classify_text(text) == code


@pytest.mark.parametrize("text", ["domain", "[NOT_A_CODE] x", "error code: 5", "Ready", "connection refused"])
def test_texts_naming_no_code(text: str) -> None:
    assert explicit_code(text) is None
