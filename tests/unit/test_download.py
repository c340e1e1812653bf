"""The ISO downloader against a real loopback HTTP server: every failure variant, Range resume,
the SSRF guard (refusal before any connection), bounded memory."""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import ssl
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from libvirt_operator.adapters.http.download import DownloadPolicy, check_destination, classify, download, safe_url
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
    """Every address a socket of this test's thread (its event loop's) tries to connect to: not the
    session operator's, which may still run in a thread of this process."""
    seen: list = []
    real = socket.socket.connect
    test_thread = threading.get_ident()

    def connect(self, address):  # type: ignore[no-untyped-def]
        if threading.get_ident() == test_thread:
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
    assert not check_destination("10.1.2.3", p)  # private: refused by default (read-back SSRF)
    assert check_destination("93.184.216.34", p)
    assert check_destination("2606:4700::1", p)
    allowed = DownloadPolicy(denied=p.denied, allowed=LOOPBACK)
    assert check_destination("127.0.0.1", allowed) and not check_destination("169.254.169.254", allowed)


# --- the address classification: every special-purpose range, and the forms that embed one ---

DEFAULT = DownloadPolicy.from_settings(Settings(knowledge_base_enabled=False))

REFUSED_BY_DEFAULT = [
    # loopback, "this network", unspecified
    "127.0.0.1", "127.255.255.254", "::1", "0.0.0.0", "0.1.2.3", "::",
    # private (RFC 1918), CGNAT, link-local and the cloud metadata endpoints
    "10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.254", "192.168.0.1", "192.168.255.255",
    "100.64.0.1", "100.127.255.254", "100.100.100.200", "169.254.0.1", "169.254.169.254", "169.254.170.2",
    "fe80::1", "fd00:ec2::254",
    # unique local, site-local
    "fc00::1", "fd12:3456:789a::1", "fec0::1",
    # IPv4-mapped IPv6 forms of loopback / private / link-local (the embedded IPv4 address is checked)
    "::ffff:127.0.0.1", "::ffff:10.1.2.3", "::ffff:192.168.1.1", "::ffff:169.254.169.254", "::ffff:100.64.0.1",
    # NAT64, well-known prefix, embedding loopback / private; and the local-use NAT64 prefix entirely
    "64:ff9b::127.0.0.1", "64:ff9b::10.1.2.3", "64:ff9b::c0a8:101", "64:ff9b::169.254.169.254",
    "64:ff9b:1::1", "64:ff9b:1::8.8.8.8",
    # 6to4 (embedding a private or a public address alike), Teredo, IPv4-compatible IPv6
    "2002:a01:203::1", "2002:c0a8:101::1", "2002:808:808::1", "2001::1", "2001:0:4136:e378::1",
    "::10.1.2.3", "::8.8.8.8",
    # multicast, broadcast, reserved (class E), benchmarking, documentation, IETF assignments
    "224.0.0.1", "239.255.255.250", "ff02::1", "ff0e::1", "255.255.255.255", "240.0.0.1",
    "198.18.0.1", "198.19.255.254", "192.0.2.1", "198.51.100.1", "203.0.113.1", "2001:db8::1",
    "3fff::1", "192.0.0.1", "192.88.99.1", "100::1", "2001:2::1", "5f00::1",
]

PUBLIC = ["8.8.8.8", "93.184.216.34", "1.1.1.1", "2606:4700::1111", "2001:4860:4860::8888",
          "::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "100.63.255.255", "100.128.0.1", "172.15.255.255",
          "172.32.0.1", "192.167.255.255", "198.17.255.255", "198.20.0.1", "223.255.255.254"]


@pytest.mark.parametrize("address", REFUSED_BY_DEFAULT)
def test_special_purpose_addresses_are_refused_by_default(address: str) -> None:
    verdict = classify(address, DEFAULT)
    assert not verdict.allowed, verdict
    assert verdict.reason and verdict.reason != "public"


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    assert classify(address, DEFAULT).allowed


def test_refusal_reasons_name_the_range() -> None:
    assert classify("10.1.2.3", DEFAULT).reason == "private (RFC 1918)"
    assert classify("100.64.0.1", DEFAULT).reason == "carrier-grade NAT (RFC 6598)"
    assert classify("fd00::1", DEFAULT).reason == "unique local (ULA)"
    mapped = classify("::ffff:10.1.2.3", DEFAULT)
    assert mapped.address == "10.1.2.3" and mapped.reason.startswith("private (RFC 1918), embedded in")
    nat64 = classify("64:ff9b::7f00:1", DEFAULT)
    assert nat64.address == "127.0.0.1" and "loopback" in nat64.reason
    assert "cloud metadata" in classify("169.254.169.254", DEFAULT).reason


def _policy(allow: tuple[str, ...] = (), deny: tuple[str, ...] = ()) -> DownloadPolicy:
    defaults = Settings(knowledge_base_enabled=False)
    return DownloadPolicy.from_settings(Settings(
        knowledge_base_enabled=False,
        download_allowed_networks=tuple(ipaddress.ip_network(n) for n in allow),
        download_denied_networks=defaults.download_denied_networks + tuple(ipaddress.ip_network(n) for n in deny)))


def test_allowed_networks_open_exceptions_and_the_most_specific_network_wins() -> None:
    # --download-allow 10.20.0.0/16 (the README's Helm example) opens that network only
    p = _policy(allow=("10.20.0.0/16",))
    assert check_destination("10.20.1.2", p) and check_destination("::ffff:10.20.1.2", p)
    assert check_destination("64:ff9b::a14:102", p)  # NAT64 form of 10.20.1.2: the same destination
    assert not check_destination("10.21.0.1", p) and not check_destination("192.168.1.1", p)
    # a more specific deny inside an allowed network wins
    p = _policy(allow=("10.0.0.0/8",), deny=("10.0.0.5/32",))
    assert check_destination("10.0.0.4", p) and not check_destination("10.0.0.5", p)
    # allowing everything still keeps the metadata endpoints, link-local, loopback and "this host" closed
    p = _policy(allow=("0.0.0.0/0", "::/0"))
    assert check_destination("10.1.2.3", p) and check_destination("fd00::1", p)
    for address in ("169.254.169.254", "169.254.1.1", "127.0.0.1", "0.0.0.0", "::1", "fe80::1",
                    "100.100.100.200", "fd00:ec2::254", "::ffff:169.254.169.254"):
        assert not check_destination(address, p), address
    # allowing CGNAT or ULA (e.g. a mesh VPN) does not open the metadata endpoints inside them
    p = _policy(allow=("100.64.0.0/10", "fc00::/7"))
    assert check_destination("100.64.0.1", p) and check_destination("fd00::1", p)
    assert not check_destination("100.100.100.200", p) and not check_destination("fd00:ec2::254", p)
    # loopback needs its own allow, and then it works in the IPv4-mapped form too
    p = _policy(allow=("127.0.0.0/8",))
    assert check_destination("127.0.0.1", p) and check_destination("::ffff:127.0.0.1", p)
    assert not check_destination("::1", p) and not check_destination("10.0.0.1", p)


@pytest.mark.parametrize("url", [
    "http://10.1.2.3/x.iso", "http://192.168.1.10:8080/x.iso", "http://172.16.0.1/x.iso",
    "http://100.64.0.1/x.iso", "http://[fd00::1]/x.iso", "http://[::ffff:10.1.2.3]/x.iso",
    "http://[64:ff9b::10.1.2.3]/x.iso", "http://[2002:a01:203::1]/x.iso", "http://198.18.0.1/x.iso",
    "https://224.0.0.1/x.iso", "http://[::ffff:127.0.0.1]:1/x.iso",
])
async def test_private_destinations_are_refused_before_any_connection(url, dest, connects) -> None:
    with pytest.raises(AppError) as info:
        await download(url, dest, policy=policy(allowed=()))
    err = info.value
    assert err.code == ErrorCode.ISO_DOWNLOAD_FAILED and err.context["permanent"] == "true"
    assert "denied destination" in err.message and "--download-allow" in err.message
    assert err.context["refused"]
    assert connects == []  # decided on the address: nothing was sent anywhere
    assert not dest.exists()


async def test_a_name_resolving_to_loopback_is_refused_without_an_allow(server, dest, connects) -> None:
    with pytest.raises(AppError) as info:
        await download(f"http://localhost:{server.port}/image", dest, policy=policy(allowed=()))
    assert "it resolves to" in info.value.message and "loopback" in info.value.context["refused"]
    assert connects == [] and server.count("/image") == 0


# --- size limits: Content-Length checked before the body, the body cut at the limit ---

BIG = 64 * 1024 * 1024  # beyond what loopback socket buffers hold: a refused body is visibly not sent
CAP = 1024 * 1024


async def test_a_declared_size_over_the_cap_is_refused_before_the_body(server, dest) -> None:
    with pytest.raises(AppError) as info:
        await download(server.url(f"/big/{BIG}"), dest, policy=policy(max_bytes=CAP))
    err = info.value
    assert err.code == ErrorCode.ISO_DOWNLOAD_FAILED and err.context["permanent"] == "true"
    assert "larger than the download limit of 1Mi" in err.message and err.context["bytes"] == str(BIG)
    assert server.count(f"/big/{BIG}") == 1  # not retried
    assert server.sent_bytes(f"/big/{BIG}") < BIG  # the client hung up, it did not read the body
    assert not dest.exists() and list(dest.parent.iterdir()) == []


@pytest.mark.parametrize("kind", ["big-chunked", "big-close"])
async def test_a_body_without_content_length_stops_at_the_cap(server, dest, kind) -> None:
    path = f"/{kind}/{BIG}"
    received: list[int] = []

    async def progress(done: int, total: int | None) -> None:
        received.append(done)

    with pytest.raises(AppError) as info:
        await download(server.url(path), dest, policy=policy(max_bytes=CAP), progress=progress)
    err = info.value
    assert err.code == ErrorCode.ISO_DOWNLOAD_FAILED and err.context["permanent"] == "true"
    assert "exceeded it" in err.message and int(err.context["bytes"]) > CAP
    assert max(received) <= CAP  # nothing beyond the cap was accepted
    assert server.count(path) == 1
    assert not dest.exists() and list(dest.parent.iterdir()) == []


async def test_the_per_call_limit_lowers_the_policy_cap_and_a_body_at_the_limit_passes(server, dest) -> None:
    size = 2 * CAP
    result = await download(server.url(f"/big-chunked/{size}"), dest, policy=policy(max_bytes=4 * CAP),
                            max_bytes=size, checksum=f"sha256:{generated_sha256(size)}")
    assert result.size == size and result.verified
    with pytest.raises(AppError):
        await download(server.url(f"/big-chunked/{size}"), dest, policy=policy(max_bytes=4 * CAP),
                       max_bytes=size - 1)
    assert not dest.exists()


async def test_check_total_can_refuse_a_declared_size_before_the_body(server, dest) -> None:
    huge = 1 << 50  # a PiB: far beyond any pool; the server never sends a body byte
    seen: list[int] = []

    async def check_total(total: int) -> None:
        seen.append(total)
        raise AppError(ErrorCode.STORAGE_FULL, f"no room for {total} bytes")

    started = time.monotonic()
    with pytest.raises(AppError) as info:
        await download(server.url(f"/huge/{huge}"), dest, policy=policy(max_bytes=None), check_total=check_total)
    assert info.value.code == ErrorCode.STORAGE_FULL and seen == [huge]
    assert time.monotonic() - started < 2.0  # decided on the headers: no waiting for the silent body
    assert not dest.exists()


def test_the_operator_wide_cap_defaults_to_16gi() -> None:
    assert DEFAULT.max_bytes == 16 * 2**30
    assert DownloadPolicy.from_settings(Settings(knowledge_base_enabled=False, download_max_bytes=0)).max_bytes is None


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


def test_the_command_line_reaches_the_guard_and_the_limits() -> None:
    import click

    from libvirt_operator.cli import main
    from libvirt_operator.cli.operator_main import settings_from_options

    params = main.commands["run"].make_context("run", [
        "--download-allow", "10.20.0.0/16", "--download-deny", "10.20.0.5/32", "--download-max-size", "2Gi",
        "--max-concurrent-imports", "2"]).params
    settings = settings_from_options(download_allow=params["download_allow"], download_deny=params["download_deny"],
                                     download_max_size=params["download_max_size"],
                                     max_concurrent_imports=params["max_concurrent_imports"])
    guard = DownloadPolicy.from_settings(settings)
    assert check_destination("10.20.0.4", guard) and not check_destination("10.20.0.5", guard)
    assert not check_destination("127.0.0.1", guard)
    assert guard.max_bytes == 2 * 2**30 and settings.iso_max_concurrent_imports == 2
    defaults = settings_from_options()
    assert defaults.download_max_bytes == 16 * 2**30 and defaults.iso_max_concurrent_imports == 4
    assert DownloadPolicy.from_settings(settings_from_options(download_max_size="0")).max_bytes is None
    for bad in ({"download_max_size": "lots"}, {"download_allow": ("10.20.0.0/33",)},
                {"max_concurrent_imports": 0}):
        with pytest.raises(click.BadParameter):
            settings_from_options(**bad)  # type: ignore[arg-type]


def test_spec_max_size_is_a_positive_quantity() -> None:
    import pydantic

    from libvirt_operator.core.api.iso import ISOImageSpec

    base = {"source": {"url": "https://mirror.example/x.iso"}, "skipChecksumVerification": True}
    assert ISOImageSpec.model_validate({**base, "maxSize": "8Gi"}).max_size == "8Gi"
    for bad in ("0", "-1Gi", "8 GiB", "lots"):
        with pytest.raises(pydantic.ValidationError):
            ISOImageSpec.model_validate({**base, "maxSize": bad})
