"""The ISO downloader against a real loopback HTTP server: every failure variant, Range resume,
the SSRF guard (refusal before any connection), bounded memory."""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import ssl
import time
import tracemalloc
from pathlib import Path

import pytest

from libvirt_operator.adapters.http.download import DownloadPolicy, check_destination, download, safe_url
from libvirt_operator.core.errors import AppError, ErrorCode, OperationAborted
from libvirt_operator.core.settings import Settings
from tests.harness.http_server import TestHTTPServer, generated_sha256, random_file

SIZE = 3 * 1024 * 1024 + 123  # not a multiple of any chunk size
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> Path:
    return random_file(tmp_path_factory.mktemp("payload") / "image.iso", SIZE)


@pytest.fixture(scope="module")
def sha256(payload: Path) -> str:
    return hashlib.sha256(payload.read_bytes()).hexdigest()


@pytest.fixture
def server(payload: Path):
    with TestHTTPServer(payload, slow_delay=0.02, stall_seconds=3.0) as srv:
        yield srv


def policy(**kw) -> DownloadPolicy:
    values = dict(allowed=LOOPBACK, retry_delay=0.05, chunk_size=256 * 1024, read_timeout=5.0, connect_timeout=5.0)
    values.update(kw)
    return DownloadPolicy.from_settings(Settings(knowledge_base_enabled=False), **values)


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "out.iso"


async def test_downloads_and_verifies_sha256(server, dest, payload, sha256) -> None:
    seen: list[tuple[int, int | None]] = []

    async def progress(done: int, total: int | None) -> None:
        seen.append((done, total))

    result = await download(server.url("/image"), dest, policy=policy(), checksum=f"sha256:{sha256}",
                            progress=progress)
    assert result.verified and result.size == SIZE and result.sha256 == sha256
    assert dest.read_bytes() == payload.read_bytes()
    assert seen[-1] == (SIZE, SIZE) and len(seen) >= SIZE // (256 * 1024)
    assert server.requests_for("/image")[0]["accept-encoding"] == "identity"


async def test_sha512_is_verified_too(server, dest, payload) -> None:
    digest = hashlib.sha512(payload.read_bytes()).hexdigest()
    result = await download(server.url("/image"), dest, policy=policy(), checksum=f"sha512:{digest}")
    assert result.checksum == f"sha512:{digest}" and result.verified


async def test_404_is_a_permanent_download_failure(server, dest) -> None:
    with pytest.raises(AppError) as info:
        await download(server.url("/missing"), dest, policy=policy())
    assert info.value.code == ErrorCode.ISO_DOWNLOAD_FAILED
    assert info.value.context["status"] == "404" and info.value.context["permanent"] == "true"
    assert server.count("/missing") == 1  # not retried
    assert not dest.exists()


async def test_500_then_ok_is_retried(server, dest, sha256) -> None:
    result = await download(server.url("/flaky"), dest, policy=policy(), checksum=f"sha256:{sha256}")
    assert result.attempts == 2 and server.count("/flaky") == 2


async def test_persistent_500_fails_after_the_attempts(payload, dest) -> None:
    with TestHTTPServer(payload, flaky_failures=100) as srv:
        with pytest.raises(AppError) as info:
            await download(srv.url("/flaky"), dest, policy=policy(attempts=3))
        assert srv.count("/flaky") == 3
    assert info.value.code == ErrorCode.ISO_DOWNLOAD_FAILED and "HTTP 500" in info.value.message
    assert "permanent" not in info.value.context
    assert not dest.exists()


async def test_slow_server_completes_with_progress(server, dest, sha256) -> None:
    calls: list[int] = []

    async def progress(done: int, total: int | None) -> None:
        calls.append(done)

    result = await download(server.url("/slow"), dest, policy=policy(chunk_size=64 * 1024),
                            checksum=f"sha256:{sha256}", progress=progress)
    assert result.size == SIZE and len(calls) >= 20 and calls == sorted(calls)


async def test_a_stalled_server_hits_the_read_timeout(server, dest) -> None:
    started = time.monotonic()
    with pytest.raises(AppError) as info:
        await download(server.url("/stall"), dest, policy=policy(read_timeout=0.5, attempts=1))
    assert "timed out" in info.value.message
    assert time.monotonic() - started < 2.5
    assert not dest.exists()


async def test_truncated_body_resumes_with_range(server, dest, payload, sha256) -> None:
    result = await download(server.url("/truncated"), dest, policy=policy(), checksum=f"sha256:{sha256}")
    assert dest.read_bytes() == payload.read_bytes()
    first, second = server.requests_for("/truncated")
    assert "range" not in first
    # resumes at what reached the file (whole chunks; the chunker's unflushed tail is fetched again)
    start = int(second["range"].removeprefix("bytes=").rstrip("-"))
    assert SIZE // 4 < start <= SIZE // 2 and second["if-range"] == server.etag
    assert result.resumed_bytes == start and result.attempts == 2


async def test_truncated_body_without_range_support_starts_over(server, dest, payload, sha256) -> None:
    result = await download(server.url("/truncated-norange"), dest, policy=policy(), checksum=f"sha256:{sha256}")
    assert dest.read_bytes() == payload.read_bytes()
    assert result.resumed_bytes == 0
    assert all("range" not in h for h in server.requests_for("/truncated-norange"))


async def test_truncated_and_out_of_attempts_fails(server, dest) -> None:
    with pytest.raises(AppError) as info:
        await download(server.url("/truncated"), dest, policy=policy(attempts=1))
    assert info.value.code == ErrorCode.ISO_DOWNLOAD_FAILED
    assert not dest.exists()


async def test_wrong_checksum_is_a_mismatch_and_leaves_nothing(server, dest, sha256) -> None:
    with pytest.raises(AppError) as info:
        await download(server.url("/corrupt"), dest, policy=policy(), checksum=f"sha256:{sha256}")
    assert info.value.code == ErrorCode.ISO_CHECKSUM_MISMATCH and not info.value.retryable
    assert info.value.context["expected"] == sha256 and info.value.context["actual"] != sha256
    assert not dest.exists() and list(dest.parent.iterdir()) == []


async def test_redirects_are_followed(server, dest, sha256) -> None:
    result = await download(server.url("/redirect-chain/3"), dest, policy=policy(), checksum=f"sha256:{sha256}")
    assert result.verified


async def test_redirect_loop_is_bounded(server, dest) -> None:
    with pytest.raises(AppError) as info:
        await download(server.url("/loop"), dest, policy=policy(max_redirects=4))
    assert "more than 4 redirects" in info.value.message
    assert server.count("/loop") == 5


async def test_too_many_redirects(server, dest) -> None:
    with pytest.raises(AppError):
        await download(server.url("/redirect-chain/6"), dest, policy=policy(max_redirects=5))


@pytest.fixture
def connects(monkeypatch) -> list:
    """Every address any socket in this process tries to connect to."""
    seen: list = []
    real = socket.socket.connect

    def connect(self, address):  # type: ignore[no-untyped-def]
        seen.append(address)
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


async def test_redirect_to_link_local_metadata_is_refused_before_connecting(server, dest, connects) -> None:
    with pytest.raises(AppError) as info:
        await download(server.url("/metadata"), dest, policy=policy())
    assert info.value.code == ErrorCode.ISO_DOWNLOAD_FAILED
    assert "169.254.169.254" in info.value.message and info.value.context["permanent"] == "true"
    assert connects, "the guard test must observe the connection to the test server"
    assert not any(str(addr[0]).startswith("169.254.") for addr in connects), connects


async def test_metadata_url_is_refused_even_when_loopback_is_allowed(dest, connects) -> None:
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/x",
                "http://[::ffff:169.254.169.254]/", "http://100.100.100.200/latest/"):
        with pytest.raises(AppError) as info:
            await download(url, dest, policy=policy())
        assert "denied destination" in info.value.message
    assert connects == []


async def test_loopback_is_denied_by_default(server, dest, connects) -> None:
    with pytest.raises(AppError) as info:
        await download(server.url("/image"), dest, policy=policy(allowed=()))
    assert "denied destination" in info.value.message
    assert connects == []


async def test_names_are_resolved_and_checked(server, dest, connects) -> None:
    # localhost resolves to loopback: refused by default, before any connection
    with pytest.raises(AppError):
        await download(f"http://localhost:{server.port}/image", dest, policy=policy(allowed=()))
    assert connects == []
    # allowed, the connection goes to the checked address (pinned), with the original Host header
    await download(f"http://localhost:{server.port}/image", dest, policy=policy(
        allowed=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))))
    assert server.requests_for("/image")[-1]["host"] == f"localhost:{server.port}"


def test_check_destination_rules() -> None:
    p = DownloadPolicy.from_settings(Settings(knowledge_base_enabled=False))
    assert not check_destination("169.254.169.254", p)
    assert not check_destination("::ffff:169.254.169.254", p)
    assert not check_destination("127.0.0.1", p) and not check_destination("::1", p)
    assert not check_destination("0.0.0.0", p)
    assert check_destination("10.1.2.3", p) and check_destination("93.184.216.34", p)
    assert check_destination("2606:4700::1", p)
    allowed = DownloadPolicy(denied=p.denied, allowed=LOOPBACK)
    assert check_destination("127.0.0.1", allowed) and not check_destination("169.254.169.254", allowed)


async def test_unsupported_schemes_are_refused(dest) -> None:
    for url in ("ftp://example.com/x.iso", "file:///etc/passwd"):
        with pytest.raises(AppError) as info:
            await download(url, dest, policy=policy())
        assert info.value.code == ErrorCode.ISO_DOWNLOAD_FAILED


async def test_authorization_header_is_sent_and_never_leaks(server, dest, sha256) -> None:
    result = await download(server.url("/auth"), dest, policy=policy(), checksum=f"sha256:{sha256}",
                            authorization=server.auth_value)
    assert result.verified
    with pytest.raises(AppError) as info:
        await download(server.url("/auth"), dest, policy=policy(), authorization="Bearer wrong")
    assert "401" in info.value.message
    assert "wrong" not in repr(info.value) + str(info.value.context)


async def test_authorization_is_dropped_on_cross_origin_redirect(server, dest) -> None:
    pol = policy(allowed=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")))
    with pytest.raises(AppError) as info:
        await download(server.url("/auth-redirect-away"), dest, policy=pol, authorization=server.auth_value)
    assert "401" in info.value.message
    assert "authorization" not in server.requests_for("/auth")[-1]


def test_safe_url_strips_credentials_and_query() -> None:
    assert safe_url("https://u:p@host:8443/a.iso?X-Amz-Signature=abc#f") == "https://host:8443/a.iso"


async def test_stop_request_aborts_and_cleans_up(server, dest) -> None:
    calls = 0

    def stop() -> bool:
        return calls >= 2

    async def progress(done: int, total: int | None) -> None:
        nonlocal calls
        calls += 1

    with pytest.raises(OperationAborted):
        await download(server.url("/slow"), dest, policy=policy(chunk_size=64 * 1024), progress=progress,
                       should_stop=stop)
    assert not dest.exists()


async def test_memory_stays_bounded_for_a_50_mb_body(server, dest) -> None:
    size = 50 * 1024 * 1024
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = await download(server.url(f"/big/{size}"), dest, policy=policy(chunk_size=64 * 1024),
                                checksum=f"sha256:{generated_sha256(size)}")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.size == size and result.verified
    # server and client in this process: a few 64 KiB chunks in flight, far from 50 MB
    assert peak < 4 * 1024 * 1024, f"peak traced memory {peak} bytes"


# --- https: the connection is pinned to the checked address, the certificate is checked by name ---

@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A CA and a server certificate for DNS:localhost only (no IP SAN: verification must use the name)."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from tests.harness.controlplane import _cert_pem, _issue, _key_pem, _name, _new_key

    ca_key, key = _new_key(), _new_key()
    ca = _issue(subject=_name("iso-test-ca"), key=ca_key, issuer=_name("iso-test-ca"), issuer_key=ca_key, is_ca=True)
    cert = _issue(subject=_name("localhost"), key=key, issuer=ca.subject, issuer_key=ca_key,
                  eku=[ExtendedKeyUsageOID.SERVER_AUTH], sans=[x509.DNSName("localhost")])
    d = tmp_path_factory.mktemp("tls")
    (d / "tls.crt").write_bytes(_cert_pem(cert))
    (d / "tls.key").write_bytes(_key_pem(key))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(d / "tls.crt", d / "tls.key")
    return ctx, _cert_pem(ca)


@pytest.fixture
def https_server(payload, tls):
    with TestHTTPServer(payload, ssl_context=tls[0], url_host="localhost") as srv:
        yield srv


LOCAL = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


async def test_https_with_a_ca_bundle(https_server, tls, dest, sha256) -> None:
    result = await download(https_server.url("/image"), dest, policy=policy(allowed=LOCAL),
                            checksum=f"sha256:{sha256}", ca_bundle=tls[1])
    assert result.verified
    assert https_server.requests_for("/image")[-1]["host"] == f"localhost:{https_server.port}"


async def test_https_without_the_ca_is_refused(https_server, dest) -> None:
    with pytest.raises(AppError) as info:
        await download(https_server.url("/image"), dest, policy=policy(allowed=LOCAL))
    assert "TLS verification failed" in info.value.message and info.value.context["permanent"] == "true"


async def test_https_never_redirects_to_http(https_server, tls, dest, connects) -> None:
    with pytest.raises(AppError) as info:
        await download(https_server.url("/downgrade"), dest, policy=policy(allowed=LOCAL), ca_bundle=tls[1])
    assert "from https to http" in info.value.message
    assert https_server.count("/image") == 0


async def test_a_bad_ca_bundle_is_an_invalid_spec(dest) -> None:
    with pytest.raises(AppError) as info:
        await download("https://localhost/x.iso", dest, policy=policy(), ca_bundle=b"not a certificate")
    assert info.value.code == ErrorCode.INVALID_SPEC
