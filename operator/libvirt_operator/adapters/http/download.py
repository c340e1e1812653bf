"""Streaming download of install media: bounded memory, hashing while streaming, resume with Range.

Safety (SSRF guard):
  * only http:// and https://; an https URL never redirects to http://;
  * the host name is resolved by us and *every* address it resolves to is checked against the
    policy before any connection is made, again after every redirect (redirects are followed by
    hand, at most `max_redirects`); one denied address refuses the whole answer (no DNS games);
  * the connection is then pinned to a checked address: the request goes to the IP literal, with the
    original Host header and (https) the original name as SNI and for certificate verification, so a
    second DNS answer cannot send it elsewhere;
  * environment proxies are ignored (a proxy would resolve names itself, outside the guard);
  * only public unicast addresses by default: loopback, private, CGNAT, link-local, ULA, NAT64 and
    IPv4-mapped forms of those, 6to4, Teredo, multicast, documentation, benchmarking and reserved
    ranges are refused (`special_purpose`); `allowed` networks (--download-allow) open exceptions,
    `denied` ones (core.settings: cloud metadata endpoints, plus --download-deny) close more; between
    the two the most specific network wins (see `classify`).

Size: a cap (`max_bytes`) is enforced against Content-Length before the body is read and again
while streaming (a missing or lying Content-Length changes nothing); `check_total` lets the caller
refuse a declared size (e.g. no room in the target pools) before the body is read.

Secrets: the Authorization header value and the CA bundle are never logged or put in errors; the
header is only sent to the URL's own origin (dropped after a cross-origin redirect). URLs in messages
lose their user info and query string (signed URLs carry tokens there).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import ipaddress
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from ...core.errors import AppError, ErrorCode, OperationAborted
from ...core.logs import get_logger
from ...core.metrics import ISO_BYTES
from ...core.quantity import format_bytes
from ...core.settings import Settings

log = get_logger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ProgressFn = Callable[[int, int | None], Awaitable[None]]
StopFn = Callable[[], bool]
TotalFn = Callable[[int], Awaitable[None]]  # the declared size, before the body: raise to refuse it
TooLargeFn = Callable[[int, bool], AppError]  # (bytes, declared by Content-Length?) → the error to raise

_REDIRECTS = {301, 302, 303, 307, 308}
_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
_ALGORITHMS = ("sha256", "sha512")


@dataclasses.dataclass(frozen=True)
class DownloadPolicy:
    denied: tuple[IPNetwork, ...] = ()
    allowed: tuple[IPNetwork, ...] = ()
    connect_timeout: float = 15.0
    read_timeout: float = 60.0
    max_redirects: int = 5
    attempts: int = 3
    retry_delay: float = 1.0  # before the 2nd attempt; doubles after each failure
    chunk_size: int = 1 << 20
    max_bytes: int | None = None  # the largest body accepted (operator-wide cap); None: unbounded

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> DownloadPolicy:
        values: dict[str, Any] = dict(
            denied=tuple(settings.download_denied_networks), allowed=tuple(settings.download_allowed_networks),
            connect_timeout=settings.download_connect_timeout, read_timeout=settings.download_read_timeout,
            max_redirects=settings.download_max_redirects, attempts=settings.download_attempts,
            max_bytes=settings.download_max_bytes or None)
        values.update(overrides)
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class DownloadResult:
    path: Path
    size: int
    sha256: str  # hex, always computed
    checksum: str  # "<algo>:<hex>" in the declared algorithm (sha256 when none was declared)
    verified: bool  # a declared checksum matched
    attempts: int
    resumed_bytes: int  # bytes not downloaded twice thanks to Range requests
    seconds: float


def safe_url(url: str | httpx.URL) -> str:
    """scheme://host[:port]/path: no user info, no query, no fragment."""
    try:
        u = httpx.URL(str(url))
        return str(u.copy_with(username=None, password=None, query=None, fragment=None))
    except (httpx.InvalidURL, TypeError, ValueError):
        return "<invalid url>"


def _fail(message: str, url: str | httpx.URL, *, permanent: bool = False, cause: BaseException | None = None,
          **context: Any) -> AppError:
    ctx: dict[str, Any] = {"url": safe_url(url), **context}
    if permanent:
        ctx["permanent"] = "true"  # the reconciler stalls at once instead of backing off
    return AppError(ErrorCode.ISO_DOWNLOAD_FAILED, message, ctx, cause=cause)


def parse_checksum(checksum: str | None) -> tuple[str, str] | None:
    if not checksum:
        return None
    algo, _, digest = checksum.partition(":")
    algo, digest = algo.strip().lower(), digest.strip().lower()
    if algo not in _ALGORITHMS or not digest or any(c not in "0123456789abcdef" for c in digest):
        raise AppError(ErrorCode.INVALID_SPEC, "checksum must be sha256:<hex> or sha512:<hex>",
                       {"field": "spec.checksum"})
    return algo, digest


# --- SSRF guard ---------------------------------------------------------------------------------
#
# Downloads become volumes a VM in the same namespace can boot and read, so a download reaching an
# internal service is a read-back SSRF. Default: only globally routable unicast addresses. The
# special-purpose ranges below (IANA special-purpose registries, plus what Python's `is_global`
# misses on 3.11: multicast, NAT64, 6to4, site-local, IPv4-compatible IPv6) are refused unless an
# allowed network (`--download-allow`) covers the address.

_V4_SPECIAL: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "'this network'"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "carrier-grade NAT (RFC 6598)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("192.88.99.0/24", "6to4 relay anycast (deprecated)"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking (RFC 2544)"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "broadcast"),
)
_V6_SPECIAL: tuple[tuple[str, str], ...] = (
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible IPv6 (deprecated)"),
    ("::/8", "reserved"),
    ("64:ff9b:1::/48", "local-use NAT64 (RFC 8215)"),
    ("100::/64", "discard-only (RFC 6666)"),
    ("2001::/23", "IETF protocol assignments"),
    ("2001::/32", "Teredo"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4 (deprecated; may embed a private IPv4 address)"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "SRv6 SIDs"),
    ("fc00::/7", "unique local (ULA)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
)
SPECIAL_NETWORKS: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), why) for net, why in (*_V4_SPECIAL, *_V6_SPECIAL))
NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether downloads may connect to an address, and why."""

    allowed: bool
    reason: str  # "allowed by 10.20.0.0/16", "private (RFC 1918)", "public", …
    address: str  # the address checked (an embedded IPv4 address when it decided)


def _embedded_v4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address really reaches: IPv4-mapped (::ffff:a.b.c.d, the same
    socket destination) or NAT64's well-known prefix (64:ff9b::a.b.c.d, translated by the gateway)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in NAT64_WELL_KNOWN:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def special_purpose(ip: IPAddress) -> str | None:
    """Why ip is not a public unicast address (None when it is one). IPv4-mapped and NAT64 forms
    are judged by their embedded IPv4 address."""
    embedded = _embedded_v4(ip)
    if embedded is not None:
        inner = special_purpose(embedded)
        return f"{inner}, embedded in {ip}" if inner else None
    matches = [(net, why) for net, why in SPECIAL_NETWORKS if net.version == ip.version and ip in net]
    if matches:
        return max(matches, key=lambda m: m[0].prefixlen)[1]  # the most specific name
    if ip.is_multicast:
        return "multicast"
    if ip.is_loopback or ip.is_unspecified:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_reserved or ip.is_private or not ip.is_global:
        return "not globally routable"
    return None


def classify(ip: IPAddress | str, policy: DownloadPolicy) -> Verdict:
    """Explicit networks first, the most specific one wins (allowed wins a tie: `--download-allow
    127.0.0.0/8` overrides the default deny of 127.0.0.0/8, and an allow of 0.0.0.0/0 does not open
    the metadata endpoints, which are denied more specifically); then special-purpose ranges are
    refused. IPv4-mapped and NAT64 forms are checked as their embedded IPv4 address too."""
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    embedded = _embedded_v4(addr)
    views = [addr] if embedded is None else [addr, embedded]
    best: tuple[int, bool, IPNetwork, IPAddress] | None = None
    for view in views:
        for allowed, nets in ((True, policy.allowed), (False, policy.denied)):
            for net in nets:
                if net.version == view.version and view in net:
                    # lengths in IPv6 terms, so an IPv4 /8 compares with IPv6 rules as ::ffff:0:0/104
                    key = (net.prefixlen + (96 if net.version == 4 else 0), allowed, net, view)
                    if best is None or key[:2] > best[:2]:
                        best = key
    if best is not None:
        _, allowed, net, view = best
        if allowed:
            return Verdict(True, f"allowed by {net}", str(view))
        why = special_purpose(view)
        return Verdict(False, f"denied by {net}" + (f": {why}" if why else ""), str(view))
    why = special_purpose(addr)
    if why is not None:
        return Verdict(False, why, str(embedded or addr))
    return Verdict(True, "public", str(addr))


def check_destination(ip: IPAddress | str, policy: DownloadPolicy) -> bool:
    """True when downloads may connect to ip (see classify)."""
    return classify(ip, policy).allowed


async def resolve_checked(host: str, port: int, policy: DownloadPolicy, url: httpx.URL) -> list[str]:
    """The addresses of host, all checked; refuses the whole answer if any address is denied."""
    literal: IPAddress | None
    try:
        literal = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        literal = None
    if literal is not None:
        candidates = [str(literal)]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as err:
            raise _fail(f"cannot resolve host {host}: {err}", url) from err
        candidates = []
        for *_, sockaddr in infos:
            ip = str(sockaddr[0]).split("%")[0]
            if ip not in candidates:
                candidates.append(ip)
    if not candidates:
        raise _fail(f"host {host} resolved to no address", url)
    for ip in candidates:
        verdict = classify(ip, policy)
        if not verdict.allowed:
            via = "" if literal is not None else f"it resolves to {ip}, "
            raise _fail(f"refusing to download from {host}: {via}a denied destination ({verdict.reason}); "
                        "downloads reach only public addresses unless the operator allows the network "
                        "(--download-allow CIDR, Helm value download.allow)", url,
                        permanent=True, address=ip, refused=verdict.reason)
    return candidates


# --- the downloader -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _SizeRules:
    limit: int | None
    too_large: TooLargeFn
    check_total: TotalFn | None


class _Retry(Exception):
    """A failure worth another attempt (server error, connection dropped, truncated body)."""


class _Sink:
    """The destination file and the running digests.

    Writing and hashing run in one dedicated thread, pipelined with the network: up to `depth`
    chunks wait for it (memory bound: depth × chunk size), in order (a single worker is FIFO).
    """

    def __init__(self, path: Path, algo: str | None, depth: int = 4) -> None:
        self.path = path
        self.algo = algo
        self.depth = depth
        self.fh: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed in finish()/aclose())
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="iso-sink")
        self._pending: collections.deque[asyncio.Future[None]] = collections.deque()
        self._shutdown = False
        self._reset_digests()

    # -- worker thread side --
    def _reset_digests(self) -> None:
        self.sha256 = hashlib.sha256()
        self.other = hashlib.new(self.algo) if self.algo and self.algo != "sha256" else None
        self.size = 0

    def _restart(self) -> None:
        self.fh.seek(0)
        self.fh.truncate()
        self._reset_digests()

    def _write(self, pieces: list[bytes]) -> None:
        for piece in pieces:  # the network's own buffers: no joining, no copies
            self.fh.write(piece)
            self.sha256.update(piece)
            if self.other is not None:
                self.other.update(piece)
            self.size += len(piece)

    def _finish(self) -> None:
        # No fsync: the cache is scratch space read back at once by the uploads (through the page
        # cache); after a node crash the pod's cache volume is gone anyway. Saves ~1 s per GiB here.
        self.fh.close()

    # -- event loop side --
    def _submit(self, fn: Callable[..., None], *args: Any) -> asyncio.Future[None]:
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def write(self, pieces: list[bytes]) -> None:
        self._pending.append(self._submit(self._write, pieces))
        while len(self._pending) >= self.depth:
            await self._pending.popleft()

    async def drain(self) -> None:
        """Wait for every queued write; `size` is then the bytes on disk."""
        while self._pending:
            await self._pending.popleft()

    async def restart(self) -> None:
        await self.drain()
        await self._submit(self._restart)

    async def finish(self) -> None:
        await self.drain()
        await self._submit(self._finish)
        self._shutdown = True
        self._executor.shutdown(wait=False)

    async def aclose(self) -> None:
        """After a failure: let queued writes end (ignoring their errors), close the file."""
        while self._pending:
            with contextlib.suppress(Exception):
                await self._pending.popleft()
        if not self._shutdown:
            with contextlib.suppress(OSError):
                await self._submit(self.fh.close)
            self._shutdown = True
            self._executor.shutdown(wait=False)
        with contextlib.suppress(OSError):
            self.fh.close()

    def digest(self, algo: str) -> str:
        return (self.sha256 if algo == "sha256" else self.other or self.sha256).hexdigest()


class Downloader:
    def __init__(self, policy: DownloadPolicy, *, ca_bundle: bytes | None = None,
                 authorization: str | None = None) -> None:
        self.policy = policy
        self._authorization = authorization  # never logged
        if ca_bundle:
            try:
                self._verify: ssl.SSLContext | bool = ssl.create_default_context(cadata=ca_bundle.decode())
            except (ssl.SSLError, ValueError, UnicodeDecodeError) as err:
                raise AppError(ErrorCode.INVALID_SPEC, "the CA bundle Secret does not hold a valid PEM bundle",
                               {"field": "spec.source.caBundleSecretRef"}) from err
        else:
            self._verify = True

    def __repr__(self) -> str:
        return f"Downloader(policy={self.policy!r})"

    async def download(self, url: str, dest: Path, *, checksum: str | None = None,
                       progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                       max_bytes: int | None = None, too_large: TooLargeFn | None = None,
                       check_total: TotalFn | None = None) -> DownloadResult:
        """Download url into dest (replaced); verify checksum when given. dest is removed on failure
        (a partial file lives only between the attempts of this call, for Range resume).

        The body may not exceed max_bytes (or the policy's, whichever is smaller): a larger declared
        Content-Length is refused before the body is read, a longer body is cut at the limit. The
        error is `too_large(bytes, declared)` when given, else a permanent ISO_DOWNLOAD_FAILED.
        check_total(size) runs once the server declared the size, before the body is read.
        """
        expected = parse_checksum(checksum)
        caps = [n for n in (max_bytes, self.policy.max_bytes) if n is not None]
        limit = min(caps) if caps else None
        size_rules = _SizeRules(
            limit, too_large or (lambda size, declared: _too_large(url, limit or 0, size, declared)), check_total)
        start_url = httpx.URL(url)
        if start_url.scheme not in ("http", "https") or not start_url.host:
            raise _fail("only http:// and https:// URLs with a host are supported", url, permanent=True)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            sink = _Sink(dest, expected[0] if expected else None)
        except OSError as err:
            raise _cache_error(err, dest) from err
        started = time.monotonic()
        policy = self.policy
        timeout = httpx.Timeout(connect=policy.connect_timeout, read=policy.read_timeout,
                                write=policy.read_timeout, pool=policy.connect_timeout)
        ok = False
        try:
            async with httpx.AsyncClient(timeout=timeout, verify=self._verify, trust_env=False,
                                         follow_redirects=False) as client:
                result = await self._attempts(client, start_url, sink, progress, should_stop, size_rules)
            await sink.finish()
            algo = expected[0] if expected else "sha256"
            actual = sink.digest(algo)
            if expected and actual != expected[1]:
                raise AppError(ErrorCode.ISO_CHECKSUM_MISMATCH,
                               f"the downloaded image's {algo} is {actual[:16]}…, the spec declares "
                               f"{expected[1][:16]}…", {"url": safe_url(url), "algorithm": algo,
                                                       "expected": expected[1], "actual": actual,
                                                       "bytes": sink.size})
            ok = True
            attempts, resumed = result
            return DownloadResult(path=dest, size=sink.size, sha256=sink.sha256.hexdigest(),
                                  checksum=f"{algo}:{actual}", verified=expected is not None,
                                  attempts=attempts, resumed_bytes=resumed,
                                  seconds=time.monotonic() - started)
        except OSError as err:  # the cache file (disk full, permissions)
            raise _cache_error(err, dest) from err
        finally:
            if not ok:
                await sink.aclose()
                with contextlib.suppress(FileNotFoundError):
                    dest.unlink()

    async def _attempts(self, client: httpx.AsyncClient, url: httpx.URL, sink: _Sink,
                        progress: ProgressFn | None, should_stop: StopFn | None,
                        rules: _SizeRules) -> tuple[int, int]:
        policy = self.policy
        validator: str | None = None  # ETag (strong) or Last-Modified of the body being written
        ranges = False
        resumed = 0
        for attempt in range(1, policy.attempts + 1):
            await sink.drain()
            resume_at = sink.size if (ranges and validator and sink.size > 0) else 0
            if not resume_at and sink.size:
                await sink.restart()
            headers = {"Accept-Encoding": "identity", "User-Agent": "libvirt-operator"}
            if resume_at:
                headers["Range"] = f"bytes={resume_at}-"
                headers["If-Range"] = validator  # type: ignore[assignment]
            try:
                async with self._open(client, url, headers) as response:
                    status = response.status_code
                    if status in _RETRYABLE_STATUS:
                        raise _Retry(f"HTTP {status}")
                    if status == 206 and resume_at and _range_start(response) == resume_at:
                        resumed += resume_at
                        total = _range_total(response)
                        log.info("resuming download", url=safe_url(url), offset=resume_at)
                    elif status in (200, 206) and not resume_at:
                        if status == 206:  # we never asked for a range
                            raise _Retry("unexpected partial content")
                        total = _content_length(response)
                    elif status == 200:  # the server ignored the Range or the body changed: start over
                        await sink.restart()
                        total = _content_length(response)
                    elif status == 206 or status == 416:
                        await sink.restart()
                        validator = None
                        raise _Retry(f"HTTP {status} with an unusable range")
                    else:
                        raise _fail(f"server answered HTTP {status} {response.reason_phrase}", url,
                                    permanent=status in (401, 403, 404, 410), status=status)
                    if status == 200:
                        ranges = response.headers.get("accept-ranges", "").lower() == "bytes"
                        etag = response.headers.get("etag")
                        validator = etag if etag and not etag.startswith("W/") else \
                            response.headers.get("last-modified")
                    if total is not None:  # declared: refuse before reading the body
                        if rules.limit is not None and total > rules.limit:
                            raise rules.too_large(total, True)
                        if rules.check_total is not None:
                            await rules.check_total(total)
                    await self._stream(response, sink, total, progress, should_stop, rules)
                    await sink.drain()
                    if total is not None and sink.size != total:
                        raise _Retry(f"body ended after {sink.size} of {total} bytes")
                    return attempt, resumed
            except (_Retry, httpx.TransportError) as err:
                if isinstance(err, httpx.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in str(err):
                    raise _fail(f"TLS verification failed: {err}", url, permanent=True, cause=err) from err
                reason = _describe(err)
                if attempt >= policy.attempts:
                    raise _fail(f"download failed after {attempt} attempts: {reason}", url,
                                cause=err, bytes=sink.size) from err
                log.info("download attempt failed, retrying", url=safe_url(url), attempt=attempt,
                         reason=reason, bytes=sink.size)
                await asyncio.sleep(policy.retry_delay * (2 ** (attempt - 1)))
        raise AssertionError("unreachable")

    async def _stream(self, response: httpx.Response, sink: _Sink, total: int | None,
                      progress: ProgressFn | None, should_stop: StopFn | None, rules: _SizeRules) -> None:
        received = sink.size  # where this response starts (after a drain)
        batch: list[bytes] = []
        batched = 0
        limit = rules.limit
        async for piece in response.aiter_raw():  # as read from the socket (≤ 64 KiB)
            if should_stop is not None and should_stop():
                raise OperationAborted("download stopped on request")
            if limit is not None and received + len(piece) > limit:  # whatever Content-Length said
                raise rules.too_large(received + len(piece), False)
            batch.append(piece)
            batched += len(piece)
            received += len(piece)
            if batched >= self.policy.chunk_size:
                await sink.write(batch)
                ISO_BYTES.labels("downloaded").inc(batched)
                batch, batched = [], 0
            if progress is not None:
                await progress(received, total)  # cheap: the callback throttles
        if batch:  # the tail; on an error above, the partial batch is dropped and fetched again
            await sink.write(batch)
            ISO_BYTES.labels("downloaded").inc(batched)

    @contextlib.asynccontextmanager
    async def _open(self, client: httpx.AsyncClient, url: httpx.URL,
                    headers: dict[str, str]) -> AsyncIterator[httpx.Response]:
        """GET url, following redirects by hand; every hop is resolved, checked and pinned."""
        origin = (url.scheme, url.host, url.port)
        current = url
        for _hop in range(self.policy.max_redirects + 1):
            if current.scheme not in ("http", "https") or not current.host:
                raise _fail(f"redirected to an unsupported URL {safe_url(current)}", url, permanent=True)
            if url.scheme == "https" and current.scheme == "http":
                raise _fail(f"refusing a redirect from https to http ({safe_url(current)})", url, permanent=True)
            port = current.port or (443 if current.scheme == "https" else 80)
            addresses = await resolve_checked(current.host, port, self.policy, current)
            hop_headers = dict(headers)
            hop_headers["Host"] = current.netloc.decode("ascii")
            if self._authorization and (current.scheme, current.host, current.port) == origin:
                hop_headers["Authorization"] = self._authorization
            extensions: dict[str, Any] = {}
            if current.scheme == "https" and not _is_ip(current.host):
                extensions["sni_hostname"] = current.host
            response: httpx.Response | None = None
            last: httpx.TransportError | None = None
            for ip in addresses:  # pinned: connect to the checked address only
                request = client.build_request("GET", current.copy_with(host=ip), headers=hop_headers,
                                               extensions=extensions)
                try:
                    response = await client.send(request, stream=True)
                    break
                except httpx.ConnectError as err:
                    last = err
            if response is None:
                assert last is not None
                raise last
            if response.status_code in _REDIRECTS:
                location = response.headers.get("location")
                await response.aclose()
                if not location:
                    raise _fail(f"HTTP {response.status_code} without a Location header", url)
                current = current.join(location)
                continue
            try:
                yield response
            finally:
                await response.aclose()
            return
        raise _fail(f"more than {self.policy.max_redirects} redirects", url, permanent=True)


async def download(url: str, dest: Path, *, policy: DownloadPolicy, checksum: str | None = None,
                   ca_bundle: bytes | None = None, authorization: str | None = None,
                   progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                   max_bytes: int | None = None, too_large: TooLargeFn | None = None,
                   check_total: TotalFn | None = None) -> DownloadResult:
    return await Downloader(policy, ca_bundle=ca_bundle, authorization=authorization).download(
        url, dest, checksum=checksum, progress=progress, should_stop=should_stop, max_bytes=max_bytes,
        too_large=too_large, check_total=check_total)


def _too_large(url: str, limit: int, size: int, declared: bool) -> AppError:
    what = f"the server declares {size} bytes" if declared else f"the body exceeded it ({size}+ bytes)"
    return _fail(f"the image is larger than the download limit of {format_bytes(limit)}: {what}", url,
                 permanent=True, limit=limit, bytes=size)


def _cache_error(err: OSError, dest: Path) -> AppError:
    return AppError(ErrorCode.ISO_DOWNLOAD_FAILED,
                    f"cannot write the download cache file: {err.strerror or err}",
                    {"path": str(dest), "errno": err.errno}, cause=err)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    return int(value) if value and value.isdigit() else None


def _content_range(response: httpx.Response) -> tuple[int, int | None] | None:
    value = response.headers.get("content-range", "")  # bytes START-END/TOTAL
    unit, _, rest = value.partition(" ")
    span, _, total = rest.partition("/")
    start, _, _end = span.partition("-")
    if unit.lower() != "bytes" or not start.isdigit():
        return None
    return int(start), (int(total) if total.isdigit() else None)


def _range_start(response: httpx.Response) -> int | None:
    parsed = _content_range(response)
    return parsed[0] if parsed else None


def _range_total(response: httpx.Response) -> int | None:
    parsed = _content_range(response)
    return parsed[1] if parsed else None


def _describe(err: BaseException) -> str:
    if isinstance(err, httpx.TimeoutException):
        return f"timed out ({type(err).__name__})"
    text = str(err) or type(err).__name__
    return text[:200]
