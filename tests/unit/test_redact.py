"""redact(): credentials never reach status.error, conditions, Events or logs, whatever text carries them."""

from __future__ import annotations

import logging
import time

import pytest

from libvirt_operator.core.conditions import set_condition
from libvirt_operator.core.errors import AppError, ErrorCode, redact
from libvirt_operator.core.logs import REDACT  # noqa: F401 - importing installs the kopf.objects filter
from libvirt_operator.reconcile.failures import error_status, human_message

SSH_KEY = """-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACB0aGlzLWlzLW5vdC1hLXJlYWwta2V5LWp1c3QtYS10ZXN0AAAA
-----END OPENSSH PRIVATE KEY-----"""
JWT = ("eyJhbGciOiJSUzI1NiIsImtpZCI6IjEyMyJ9.eyJpc3MiOiJrdWJlcm5ldGVzL3NlcnZpY2VhY2NvdW50In0."
       "c2lnbmF0dXJlLW9mLXRoZS10b2tlbg")

CASES = [
    # (text, secret that must disappear, text that must stay)
    ("qemu+ssh://root:hunter2@host/system", "hunter2", "@host/system"),
    ("GET https://alice:pa55@mirror.example/x.iso: 401", "pa55", "mirror.example/x.iso"),
    ("https://mirror.example/x.iso?password=hunter2&arch=amd64", "hunter2", "arch=amd64"),
    ("https://mirror.example/x.iso?access_token=abc123def&v=2", "abc123def", "v=2"),
    ("https://bucket.s3.example/x.iso?X-Amz-Credential=AKIAEXAMPLE%2F2024&X-Amz-Signature=f00dbeef",
     "f00dbeef", "bucket.s3.example/x.iso"),
    ("https://blob.example/x.iso?sv=2022&sig=Zm9vYmFyYmF6%3D&se=2030", "Zm9vYmFyYmF6", "se=2030"),
    ("https://h/x?X-Amz-Credential=AKIAEXAMPLE&y=1", "AKIAEXAMPLE", "y=1"),
    ("request failed: Authorization: Bearer s3cr3t-t0ken-value", "s3cr3t-t0ken-value", "request failed"),
    ("headers={'authorization': 'Basic YWxpY2U6cGFzcw=='}", "YWxpY2U6cGFzcw", "headers="),
    ("proxy said: Bearer abcdefghijklmnop.qrstuv", "abcdefghijklmnop", "proxy said"),
    ("login with token=abcdef0123456789 failed", "abcdef0123456789", "failed"),
    ('config: {"password": "correct horse"}', "correct horse", "config"),
    ("client_secret = s3cr3t, api_key: k3y", "s3cr3t", "client_secret"),
    ("client_secret = s3cr3t, api_key: k3y", "k3y", "api_key"),
    (f"cannot parse key:\n{SSH_KEY}\nend", "b3BlbnNzaC1rZXktdjEA", "end"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAtruncated", "MIIEowIBAAKCAQEA", "RSA PRIVATE KEY"),
    ("-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIabc\n-----END EC PRIVATE KEY-----", "MHcCAQEEIabc", "EC PRIVATE"),
    (f"token rejected: {JWT}", "c2lnbmF0dXJlLW9mLXRoZS10b2tlbg", "token rejected"),
]


@pytest.mark.parametrize(("text", "secret", "kept"), CASES, ids=[c[0][:40] for c in CASES])
def test_redact_scrubs_credentials_and_keeps_the_rest(text: str, secret: str, kept: str) -> None:
    out = redact(text)
    assert secret not in out, out
    assert kept in out, out
    assert "***" in out
    assert redact(out) == out  # idempotent: redacting twice changes nothing


@pytest.mark.parametrize("text", [
    "unable to connect to server at '10.1.2.3:16509': Connection refused",
    "Permission denied (publickey,password).",
    "Secret default/nope named by credentialsSecretRef does not exist",
    "Cannot access storage file '/var/lib/libvirt/images/vm-root.qcow2': No such file or directory",
    "see https://runbooks.example/rag/runbooks/host-unreachable.md",
    "domain 'team-a--web' is already defined with uuid 0b5f4b6e-0d2c-4e8a-8c39-4c1d5f0f2f11",
    "public key: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB user@host",  # public keys are not secrets
])
def test_redact_leaves_ordinary_messages_alone(text: str) -> None:
    assert redact(text) == text


@pytest.mark.parametrize("text", ["a" * 200_000, "a-" * 100_000, "?" + "a=" * 100_000, "http://" * 30_000,
                                  "eyJaaaa." * 30_000, "-----BEGIN PRIVATE KEY-----" * 8_000, "Bearer " * 30_000])
def test_redact_stays_fast_on_hostile_input(text: str) -> None:
    """Error text can come from a hostile host or download server: no catastrophic backtracking."""
    started = time.perf_counter()
    redact(text)
    assert time.perf_counter() - started < 3


def test_every_user_visible_channel_is_redacted() -> None:
    """status.error.message, condition messages, Event text (human_message) and kopf's own Events."""
    leak = "GET https://u:pw1@mirror.example/x.iso?token=tok2 Authorization: Bearer tok3tok3tok3"
    err = AppError(ErrorCode.ISO_DOWNLOAD_FAILED, leak, {"url": "https://u:pw4@h/x", "password": "pw5"})
    import asyncio

    status = asyncio.run(error_status(err, None, "ISOImage", None))
    conditions = set_condition([], "Ready", False, err.reason, f"raw: {leak}", 1)
    event_text = human_message(err, status)
    for text in (status["message"], str(status["context"]), conditions[0]["message"], event_text):
        for secret in ("pw1", "tok2", "tok3", "pw4", "pw5"):
            assert secret not in text, text


def test_kopf_object_logs_and_their_events_are_redacted() -> None:
    """kopf turns warnings of its `kopf.objects` logger into Events (K8sPoster): e.g. "Handler failed
    temporarily: <exception text>". The filter scrubs the record before any handler sees it."""
    seen: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(self.format(record))

    logger = logging.getLogger("kopf.objects")
    handler = Capture()
    logger.addHandler(handler)
    try:
        logger.warning("Handler 'create' failed temporarily: %s", "https://u:pw@h/x?sig=abc Bearer abcdefghijkl")
        try:
            raise RuntimeError("password=hunter2")
        except RuntimeError:
            logger.exception("Handler 'create' failed with an exception")
    finally:
        logger.removeHandler(handler)
    assert len(seen) == 2
    for text in seen:
        for secret in ("pw@", "abc ", "abcdefghijkl", "hunter2"):
            assert secret not in text, text
    assert "failed temporarily" in seen[0] and "RuntimeError" in seen[1]


def test_status_error_message_is_capped() -> None:
    """A host or server can return megabytes of error text: status.error.message stays small."""
    import asyncio

    err = AppError(ErrorCode.LIBVIRT_ERROR, "x" * 1_000_000)
    status = asyncio.run(error_status(err, None, "LibvirtHost", None))
    assert len(status["message"]) <= 4096
    assert len(set_condition([], "Ready", False, err.reason, err.message, 1)[0]["message"]) <= 32768
