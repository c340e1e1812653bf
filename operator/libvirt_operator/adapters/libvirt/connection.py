"""Pooled libvirt connections, one per host, with bounded per-host concurrency.

libvirt calls are blocking C calls: every call runs in a daemon thread (reused: .threads), bounded by the
host's call slots (uploads: stream slots), so a slow or hung host can neither block kopf's event loop,
starve the other hosts, nor keep the process from exiting.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import libvirt

from ...core import hosturi
from ...core.errors import AppError, ErrorCode
from ...core.logs import get_logger
from ...core.metrics import HOST_CONNECTED, LIBVIRT_CALL_SECONDS, LIBVIRT_CALLS, LIBVIRT_CALLS_IN_FLIGHT
from .credentials import CredentialFiles
from .errors import CONNECTION_LOST, classify_libvirt_error
from .events import ensure_event_thread
from .threads import CallThreads

T = TypeVar("T")
log = get_logger(__name__)
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, not printed
CALL_THREADS = CallThreads()  # every host's calls; a hung call keeps its thread, the next call gets another


@dataclasses.dataclass(frozen=True)
class ConnectOptions:
    """What is needed to open a connection. `credentials` holds Secret data (never logged)."""

    uri: str
    max_concurrent_calls: int = 16  # spread over ceil(16 / CALLS_PER_CONNECTION) connections
    credentials: Mapping[str, bytes] = dataclasses.field(default_factory=dict, repr=False)
    call_timeout: float = 60.0       # one call, from the moment it runs (not while it waits for a slot)
    connect_timeout: float = 20.0    # one connect attempt (ssh's own ConnectTimeout is half of it)
    max_concurrent_streams: int = 2  # uploads/downloads: their own slots, apart from the call slots
    queue_timeout: float = 300.0     # waiting for a free slot


# libvirtd serves at most `max_client_requests` (default 5) requests of one client connection at once and
# reads no more from its socket meanwhile: more call slots than that on one connection only queue inside
# the daemon. Calls are therefore spread over ceil(slots / CALLS_PER_CONNECTION) connections to the host.
CALLS_PER_CONNECTION = 4
# Calls that stay on the main connection: the ones whose result is bound to it (event subscriptions,
# console streams) and the probe, which tests that connection. Streams (stream=True) stay there too.
MAIN_CONNECTION_ONLY = frozenset({"subscribe", "open-console", "probe"})


def shares_state_across_connections(uri: str) -> bool:
    """Whether two connections to `uri` see the same domains. A daemon (qemu://, any +transport) does;
    libvirt's test driver keeps a private world per connection for a file URI (`test:///path.xml`), so
    such a host gets no extra connections: a domain defined over one would be missing on the other."""
    scheme, _, rest = uri.partition("://")
    return scheme.split("+")[0] != "test" or rest.rstrip("/") == "/default"


class _Slots:
    """A counting bound that event-loop code waits on and any thread releases.

    A call holds its slot until its thread really ends (not when its caller stops waiting), so a host
    whose calls hang can never have more than `size` threads stuck on it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = size
        self._lock = threading.Lock()
        self._waiters: collections.deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = collections.deque()

    @property
    def busy(self) -> int:
        return self.size - self._free

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, waiter))
        try:
            await waiter
        except BaseException:
            with self._lock:
                queued = (loop, waiter) in self._waiters
                if queued:
                    self._waiters.remove((loop, waiter))
            if not queued and waiter.done() and not waiter.cancelled():
                self.release()  # granted, but the caller is gone: pass it on
            raise  # (granted after the cancellation: _grant hands it on)

    def release(self) -> None:
        with self._lock:
            while self._waiters:
                loop, waiter = self._waiters.popleft()
                try:
                    loop.call_soon_threadsafe(self._grant, waiter)
                    return
                except RuntimeError:  # that loop is closed: its waiter is gone
                    continue
            self._free += 1

    def _grant(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done():  # cancelled meanwhile
            self.release()
        else:
            waiter.set_result(None)


class _Live:
    """One open virConnect, its credential files and the calls running on it. A retired connection
    takes no new calls and is closed when its last running call returns, never under one."""

    def __init__(self, conn: libvirt.virConnect, creds: CredentialFiles | None, uri: str) -> None:
        self.conn, self.creds, self.uri = conn, creds, uri
        self.in_flight = 0
        self.retired = False
        self.closed = False


_CLOSE_REASONS = {0: "an error on the connection", 1: "end of file from the host",
                  2: "no keepalive answer from the host", 3: "closed by the client"}


class Lease:
    """A raw connection held open for another thread (HostConnection.lease). Thread-safe; released once."""

    def __init__(self, host: HostConnection, live: _Live) -> None:
        self._host, self._live = host, live
        self._lock = threading.Lock()
        self._state = "held"  # held → using → done, or held → done

    def begin(self) -> libvirt.virConnect:
        """Called by the thread that uses the connection, before its first call."""
        with self._lock:
            if self._state != "held":
                raise AppError(ErrorCode.LIBVIRT_TIMEOUT, "the lease of the connection ended before its work began",
                               {"host": self._host.name})
            self._state = "using"
        return self._live.conn

    def release(self) -> None:
        """Called by that thread when it is done (any thread; blocking: it may close a lost connection)."""
        with self._lock:
            if self._state == "done":
                return
            self._state = "done"
        self._host._streams.release()
        self._host._leave(self._live)

    def release_unused(self) -> bool:
        """Release a lease whose thread never began; False when it did (that thread releases it)."""
        with self._lock:
            if self._state != "held":
                return False
            self._state = "done"
        self._host._streams.release()
        threading.Thread(target=self._host._leave, args=(self._live,), daemon=True,
                         name=f"libvirt-release-{self._host.name}").start()
        return True


class HostConnection:
    """A lazily opened, self-healing connection to one libvirt host.

    - Connecting is single-flight and never holds a lock: one attempt at a time per host (in its own
      thread); callers wait for it at most `connect_timeout`, and once an attempt is overdue they fail
      at once (HOST_UNREACHABLE naming the URI and the step) instead of queueing behind it. An overdue
      qemu+ssh attempt is ended by stopping its ssh process.
    - Calls run in daemon threads (a hung C call can never keep the process from exiting), bounded by
      the host's call slots; uploads and other streams have their own, separate slots. A call's
      timeout counts the call itself, not the time spent waiting for a slot.
    - A lost connection (libvirt's close callback: EOF, keepalive failure) is retired at once and
      reported to `on_lost` hooks; it is closed when its last running call has returned.
    """

    def __init__(self, name: str, options: ConnectOptions) -> None:
        self.name = name
        self.options = options
        self._lock = threading.Lock()  # guards the fields below; never held across a libvirt call
        self._live: _Live | None = None
        self._connecting: concurrent.futures.Future[_Live] | None = None
        self._connect_started = 0.0
        self._connect_creds: CredentialFiles | None = None
        self._closed = False
        self._calls = _Slots(options.max_concurrent_calls)
        self._streams = _Slots(options.max_concurrent_streams)
        self._extras: list[_Live] = []  # more connections for calls (see CALLS_PER_CONNECTION)
        self._extra_opening = False
        self._extra_creds: set[CredentialFiles] = set()  # of extras being opened (their ssh is stopped on close)
        self.uri = _display_uri(options.uri)
        self.on_connect: list[Callable[[libvirt.virConnect], None]] = []
        self.on_lost: list[Callable[[str], None]] = []  # called on libvirt's event thread

    @property
    def closed(self) -> bool:
        return self._closed

    # -- connecting --------------------------------------------------------------------------
    def _connect_blocking(self, attempt: concurrent.futures.Future[_Live]) -> None:
        """One connect attempt (its own daemon thread); the result goes to `attempt`."""
        try:
            live = self._open_blocking(attempt)
            with self._lock:
                current = self._connecting is attempt and not self._closed
                if current:
                    self._live, self._connecting, self._connect_creds = live, None, None
            if not current:  # abandoned (overdue, or the host was removed) meanwhile
                _dispose(live)
                raise AppError(ErrorCode.HOST_UNREACHABLE, f"connection to {self.uri} abandoned",
                               {"host": self.name, "operation": "connect", "uri": self.uri})
            HOST_CONNECTED.labels(self.name).set(1)
            for hook in list(self.on_connect):
                try:
                    hook(live.conn)
                except Exception:  # noqa: BLE001  (a subscriber's failure is not a failed connect)
                    log.exception("on_connect hook failed", host=self.name)
            attempt.set_result(live)
        except BaseException as err:  # noqa: BLE001  (handed to the waiters)
            with self._lock:
                if self._connecting is attempt:
                    self._connecting, self._connect_creds = None, None
            attempt.set_exception(err)

    def _open_blocking(self, attempt: concurrent.futures.Future[_Live] | None) -> _Live:
        """Open one connection (a worker thread). `attempt`: the main connection's connect attempt (its
        credential files are tracked so that an overdue ssh can be stopped); None: an extra connection."""
        creds: CredentialFiles | None = None
        try:
            ensure_event_thread()  # keepalives and close callbacks need libvirt's event loop
            parsed = _checked_uri(self.options)
            uri = parsed.render()
            if self.options.credentials:
                creds = CredentialFiles(self.options.credentials, self.options.connect_timeout)
                uri = creds.uri_for(parsed)
                with self._lock:
                    if attempt is not None:
                        self._connect_creds = creds
                    else:
                        self._extra_creds.add(creds)
            started = time.perf_counter()
            try:
                conn = libvirt.openAuth(uri, [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE],
                                              _no_interactive_auth, None], 0)
            except libvirt.libvirtError as err:
                LIBVIRT_CALLS.labels(self.name, "connect", "error").inc()
                if parsed.driver == "test":  # its parse errors quote the file: never pass them on
                    raise AppError(ErrorCode.HOST_UNREACHABLE,
                                   f"libvirt's test driver could not load {parsed.test_file or 'its default host'}"
                                   " (not a readable test-driver host file; details withheld as they may "
                                   "quote the file)", {"host": self.name, "operation": "connect"}) from None
                ssh_log = None
                if parsed.transport == "ssh":
                    ssh_log = creds.ssh_failure() if creds else None
                elif parsed.ssh:
                    ssh_log = str(err)
                raise _connect_error(err, self.name, parsed, ssh_log, self.uri) from err
            finally:
                LIBVIRT_CALL_SECONDS.labels(self.name, "connect").observe(time.perf_counter() - started)
            LIBVIRT_CALLS.labels(self.name, "connect", "ok").inc()
            if creds is not None:
                creds.forget_private_keys()
            live = _Live(conn, creds, self.uri)
            creds = None  # owned by `live` from here on
            with contextlib.suppress(libvirt.libvirtError):
                conn.setKeepAlive(5, 3)
            with contextlib.suppress(libvirt.libvirtError):
                conn.registerCloseCallback(self._on_close, live)
            return live
        except BaseException:
            if creds is not None:
                with self._lock:
                    self._extra_creds.discard(creds)
                creds.remove()
            raise

    # -- extra connections (calls beyond CALLS_PER_CONNECTION) -----------------------------------
    def _wanted_connections(self) -> int:
        if not shares_state_across_connections(self.options.uri):
            return 1
        return max(1, -(-self._calls.size // CALLS_PER_CONNECTION))

    def _open_extras(self) -> None:
        """Open the extra connections the call slots need, one after the other (its own daemon thread);
        each joins the others as soon as it is open. The first burst that fills the main connection
        brings the host up to its full set; a failure stops (the next full burst tries again)."""
        try:
            while True:
                with self._lock:
                    if self._closed or 1 + len(self._extras) >= self._wanted_connections():
                        return
                live: _Live | None = None
                try:
                    live = self._open_blocking(None)
                except BaseException as err:  # noqa: BLE001  (calls keep using the connections there are)
                    log.info("extra libvirt connection not opened", host=self.name,
                             error=getattr(err, "message", None) or type(err).__name__)
                    return
                with self._lock:
                    keep = not self._closed and not live.retired
                    if keep:
                        self._extras.append(live)
                    if live.creds is not None:
                        self._extra_creds.discard(live.creds)
                if not keep:
                    _dispose(live)
                    return
        finally:
            with self._lock:
                self._extra_opening = False

    def _pick_and_enter(self, main: _Live, operation: str, stream: bool) -> _Live | None:
        """The connection for one call, entered (counted as running on it); None when `main` is closed.
        The least busy of the main connection and the open extras; the missing extras are opened in the
        background when all of them carry CALLS_PER_CONNECTION calls and fewer than the slots need are open."""
        with self._lock:
            if main.closed:
                return None
            target = main
            if not stream and operation not in MAIN_CONNECTION_ONLY:
                for extra in self._extras:
                    if not extra.retired and not extra.closed and extra.in_flight < target.in_flight:
                        target = extra
                lanes = 1 + sum(1 for e in self._extras if not e.retired)
                if (target.in_flight >= CALLS_PER_CONNECTION and lanes < self._wanted_connections()
                        and not self._extra_opening and not self._closed):
                    self._extra_opening = True
                    threading.Thread(target=self._open_extras, daemon=True,
                                     name=f"libvirt-connect-extra-{self.name}").start()
            target.in_flight += 1
            return target

    async def _connected(self) -> _Live:
        """The live connection, opening it (single-flight) when needed."""
        with self._lock:
            self._check_open()
            live = self._live
            if live is not None and not live.retired:
                return live
            attempt = self._connecting
            if attempt is None:
                attempt = self._connecting = concurrent.futures.Future()
                self._connect_started = time.monotonic()
                threading.Thread(target=self._connect_blocking, args=(attempt,), daemon=True,
                                 name=f"libvirt-connect-{self.name}").start()
            waited = time.monotonic() - self._connect_started
        remaining = self.options.connect_timeout - waited
        if remaining > 0:
            wrapped = asyncio.wrap_future(attempt)
            try:
                return await asyncio.wait_for(asyncio.shield(wrapped), remaining)
            except (asyncio.TimeoutError, TimeoutError):
                waited = time.monotonic() - self._connect_started
                # its outcome arrives later, or never: nobody waits for it any more
                wrapped.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._connect_overdue(attempt, waited)
        raise AppError(ErrorCode.HOST_UNREACHABLE,
                       f"{self.uri} hung: no answer within {waited:.0f}s while connecting "
                       f"(step: connect, {self._connect_step()})",
                       {"host": self.name, "operation": "connect", "uri": self.uri, "step": "connect"})

    def _connect_step(self) -> str:
        parsed = hosturi.parse(self.options.uri)
        if parsed.transport == "ssh":
            return f"ssh to {parsed.endpoint} and libvirt's open over it"
        return f"libvirt's open of {parsed.endpoint}"

    def _connect_overdue(self, attempt: concurrent.futures.Future[_Live], waited: float) -> None:
        """An attempt that outlived connect_timeout: stop its ssh (which ends the blocked open); one
        that outlives it three times over is abandoned so that the next call starts afresh."""
        with self._lock:
            creds = self._connect_creds if self._connecting is attempt else None
            if self._connecting is attempt and waited >= 3 * self.options.connect_timeout:
                self._connecting = None  # its thread discards whatever it gets
        if creds is not None:
            creds.kill_ssh()

    def _check_open(self) -> None:
        if self._closed:
            raise AppError(ErrorCode.HOST_NOT_FOUND, f"host {self.name} was removed", {"host": self.name})

    # -- losing and retiring -----------------------------------------------------------------
    def _on_close(self, _conn: libvirt.virConnect, reason: int, live: _Live) -> None:
        if reason == libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT:
            return
        why = _CLOSE_REASONS.get(reason, f"reason {reason}")
        log.warning("libvirt connection lost", host=self.name, reason=why)
        self._retire(live, lost=f"connection to {self.uri} lost: {why}")

    def _retire(self, live: _Live, lost: str | None = None) -> None:
        """No new calls on `live`; it is closed now if idle, else by its last running call."""
        with self._lock:
            was_current = self._live is live
            if was_current:
                self._live = None
            with contextlib.suppress(ValueError):
                self._extras.remove(live)
            first = not live.retired
            live.retired = True
            close_now = live.in_flight == 0 and not live.closed
            if close_now:
                live.closed = True
        if was_current:
            HOST_CONNECTED.labels(self.name).set(0)
        if close_now:
            threading.Thread(target=_dispose, args=(live,), daemon=True, name=f"libvirt-close-{self.name}").start()
        if lost and first and was_current and not self._closed:
            for hook in list(self.on_lost):
                with contextlib.suppress(Exception):
                    hook(lost)

    def _enter(self, live: _Live) -> bool:
        with self._lock:
            if live.closed:
                return False
            live.in_flight += 1
            return True

    def _leave(self, live: _Live) -> None:
        with self._lock:
            live.in_flight -= 1
            close_now = live.retired and live.in_flight == 0 and not live.closed
            if close_now:
                live.closed = True
        if close_now:
            _dispose(live)  # already on a worker thread

    # -- calls -------------------------------------------------------------------------------
    def _run_blocking(self, live: _Live, operation: str, fn: Callable[[libvirt.virConnect], T],
                      slots: _Slots, loop: asyncio.AbstractEventLoop, done: asyncio.Future[T]) -> None:
        result: Any = None
        error: BaseException | None = None
        in_flight = LIBVIRT_CALLS_IN_FLIGHT.labels(self.name, operation)
        in_flight.inc()
        started = time.perf_counter()
        try:
            result = fn(live.conn)
            LIBVIRT_CALLS.labels(self.name, operation, "ok").inc()
        except libvirt.libvirtError as err:
            LIBVIRT_CALLS.labels(self.name, operation, "error").inc()
            if err.get_error_code() in CONNECTION_LOST and not _is_alive(live.conn):
                self._retire(live, lost=f"connection to {self.uri} lost during {operation}")
                error = _Lost(err)
            else:
                error = classify_libvirt_error(err, host=self.name, operation=operation)
                error.__cause__ = err
        except BaseException as err:  # noqa: BLE001  (handed to the caller)
            error = err
        finally:
            LIBVIRT_CALL_SECONDS.labels(self.name, operation).observe(time.perf_counter() - started)
            in_flight.dec()
            slots.release()
            self._leave(live)

        def deliver() -> None:
            if done.done():
                return  # the caller gave up (timeout, cancellation)
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)

        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is waiting
            loop.call_soon_threadsafe(deliver)

    async def call(self, operation: str, fn: Callable[[libvirt.virConnect], T],
                   timeout: float | None = None, *, stream: bool = False) -> T:
        """Run fn(conn) in a thread of this host; the event loop never blocks on libvirt.

        `timeout` bounds the call itself (default: the host's call timeout); waiting for one of the
        host's slots is bounded separately (`queue_timeout`). `stream=True`: an upload or download,
        which takes one of the host's stream slots instead of a call slot."""
        timeout = timeout or self.options.call_timeout
        slots = self._streams if stream else self._calls
        loop = asyncio.get_running_loop()
        reopened = False
        while True:
            live = await self._connected()
            try:
                await asyncio.wait_for(slots.acquire(), self.options.queue_timeout)
            except (asyncio.TimeoutError, TimeoutError) as err:
                LIBVIRT_CALLS.labels(self.name, operation, "timeout").inc()
                kind = "stream" if stream else "call"
                raise AppError(ErrorCode.LIBVIRT_TIMEOUT,
                               f"libvirt {kind} {operation} on {self.uri} waited {self.options.queue_timeout:.0f}s "
                               f"for one of the host's {slots.size} {kind} slots (all busy)",
                               {"host": self.name, "operation": operation, "uri": self.uri,
                                "step": "queue"}) from err
            target = self._pick_and_enter(live, operation, stream)
            if target is None:  # closed meanwhile (retired and idle): take the next one
                slots.release()
                continue
            done: asyncio.Future[T] = loop.create_future()
            CALL_THREADS.submit(f"libvirt-{self.name}-{operation}", self._run_blocking,
                                target, operation, fn, slots, loop, done)
            try:
                return await asyncio.wait_for(done, timeout)
            except _Lost as lost:
                if not reopened:
                    reopened = True
                    log.info("libvirt connection lost, reopening", host=self.name, operation=operation)
                    continue
                raise classify_libvirt_error(lost.err, host=self.name, operation=operation) from lost.err
            except (asyncio.TimeoutError, TimeoutError) as err:
                LIBVIRT_CALLS.labels(self.name, operation, "timeout").inc()
                raise AppError(ErrorCode.LIBVIRT_TIMEOUT,
                               f"{self.uri} hung: libvirt call {operation} did not finish within {timeout:.0f}s "
                               f"(step: {operation})",
                               {"host": self.name, "operation": operation, "uri": self.uri,
                                "step": operation}) from err

    async def lease(self, operation: str) -> Lease:
        """The raw connection for work another host's thread drives for a long time (the target side of a
        live migration). Holds one stream slot and counts as a running call until released, so a lost
        connection is retired but never closed under that thread (libvirt aborts the process on a call
        into a closed connection). The driving thread calls `begin()` before using it and `release()`
        when done; `release_unused()` frees a lease whose thread never began."""
        live = await self._connected()
        try:
            await asyncio.wait_for(self._streams.acquire(), self.options.queue_timeout)
        except (asyncio.TimeoutError, TimeoutError) as err:
            raise AppError(ErrorCode.LIBVIRT_TIMEOUT,
                           f"libvirt {operation} on {self.uri} waited {self.options.queue_timeout:.0f}s for one of "
                           f"the host's {self._streams.size} stream slots (all busy)",
                           {"host": self.name, "operation": operation, "uri": self.uri, "step": "queue"}) from err
        if not self._enter(live):
            self._streams.release()
            raise AppError(ErrorCode.HOST_UNREACHABLE, f"connection to {self.uri} lost before {operation}",
                           {"host": self.name, "operation": operation, "uri": self.uri})
        return Lease(self, live)

    def in_flight(self) -> int:
        """Calls and streams running on this host now."""
        return self._calls.busy + self._streams.busy

    async def close(self, *, abort: bool = False) -> None:
        """Take no more calls; close the connection once idle. Never waits for a hung host: a pending
        connect's ssh is stopped, and libvirt's close runs in a daemon thread. `abort` (the host is
        removed, the operator stops): calls still running are ended too (their ssh is stopped)."""
        with self._lock:
            self._closed = True
            live, self._live = self._live, None
            creds = self._connect_creds
            self._connecting, self._connect_creds = None, None
            extras, opening = list(self._extras), list(self._extra_creds)
        if creds is not None:
            creds.kill_ssh()
            creds.remove()
        for pending in opening:  # an extra still connecting: its thread disposes of it (host closed)
            pending.kill_ssh()
        for lane in ([live] if live is not None else []) + extras:
            self._retire(lane)
            if abort and lane.creds is not None and lane.in_flight:
                lane.creds.kill_ssh()  # calls still running on a removed host: end them now
        HOST_CONNECTED.labels(self.name).set(0)


class _Lost(Exception):
    """A call found its connection gone; the caller retries once on a fresh connection."""

    def __init__(self, err: libvirt.libvirtError) -> None:
        super().__init__(str(err))
        self.err = err


def _is_alive(conn: libvirt.virConnect) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def _dispose(live: _Live) -> None:
    """Close a connection for good (a worker thread: close() may block on a dead transport)."""
    conn = live.conn
    # Event callbacks hold references to the connection: left registered, close() only drops ours
    # and the transport (socket, ssh child) stays open for the life of the process.
    for callback_id in list(getattr(conn, "domainEventCallbackID", None) or ()):
        with contextlib.suppress(libvirt.libvirtError):
            conn.domainEventDeregisterAny(callback_id)
    with contextlib.suppress(libvirt.libvirtError):
        conn.unregisterCloseCallback()
    if live.creds is not None and not _is_alive(conn):
        live.creds.kill_ssh()
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()
    if live.creds is not None:
        live.creds.kill_ssh()
        live.creds.remove()


def _display_uri(uri: str) -> str:
    """The URI as the user wrote it, for messages (no parameters the operator adds; never a secret:
    the grammar refuses passwords)."""
    try:
        return hosturi.parse(uri).render()
    except hosturi.HostUriError:
        return "(invalid URI)"


def _no_interactive_auth(credentials: list, _opaque: object) -> int:
    return -1  # the operator never prompts: credentials come from Secrets


def _checked_uri(options: ConnectOptions) -> hosturi.HostUri:
    """The URI's grammar again (reconcile checked it with the settings) and the Secret keys it needs."""
    try:
        parsed = hosturi.parse(options.uri)
    except hosturi.HostUriError as err:
        raise AppError(ErrorCode.INVALID_SPEC, f"invalid LibvirtHost spec: uri refused: {err}", {"field": "spec.uri"}) from None
    needed = hosturi.secret_keys(parsed)
    if parsed.ssh and needed is not None:
        missing = hosturi.missing_keys_message("credentialsSecretRef", needed, list(options.credentials))
        if missing:
            raise AppError(ErrorCode.CREDENTIALS_NOT_FOUND, missing, {})
    return parsed


# ssh's own log (qemu+ssh) or libvirt's libssh/libssh2 transport errors (qemu+libssh, qemu+libssh2)
_SSH_KEY_CHANGED = re.compile(r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key for \S+ has changed"
                              r"|SSH HOST KEY VERIFICATION FAILED|differs from stored identity")
_SSH_KEY_UNKNOWN = re.compile(r"No \S+ host key is known for|no suitable callback for host key verification")
_SSH_KEY_REFUSED = re.compile(r"Permission denied \(([^)]*)\)")
_SSH_TIMED_OUT = re.compile(r"timed out during banner exchange|Connection timed out|Operation timed out")


def _ssh_error(parsed: hosturi.HostUri, ssh_log: str, host: str, uri: str = "") -> AppError | None:
    context = {"host": host, "operation": "connect"}
    where = parsed.endpoint
    if _SSH_TIMED_OUT.search(ssh_log):
        step = "ssh banner exchange" if "banner" in ssh_log else "ssh connect"
        return AppError(ErrorCode.HOST_UNREACHABLE,
                        f"{uri or where} hung: ssh to {where} got no answer in time (step: connect, {step})",
                        {**context, "uri": uri or where, "step": "connect"})
    if _SSH_KEY_CHANGED.search(ssh_log):
        return AppError(ErrorCode.HOST_AUTH_FAILED,
                        f"host key mismatch for {where}: the key it presented is not the one in the Secret's "
                        "known_hosts (ssh host key verification failed)", context)
    if _SSH_KEY_UNKNOWN.search(ssh_log):
        return AppError(ErrorCode.HOST_AUTH_FAILED,
                        f"host key mismatch for {where}: the Secret's known_hosts has no key for it (entries for "
                        "a port other than 22 are written [host]:port; ssh host key verification failed)", context)
    if "Host key verification failed" in ssh_log:
        return AppError(ErrorCode.HOST_AUTH_FAILED,
                        f"host key mismatch for {where} (ssh host key verification failed)", context)
    refused = _SSH_KEY_REFUSED.search(ssh_log)
    if refused:
        return AppError(ErrorCode.HOST_AUTH_FAILED,
                        f"{where} refused the ssh key in the Secret's ssh-privatekey for user "
                        f"{parsed.user or '(default)'}: Permission denied ({refused.group(1)})", context)
    return None


def _connect_error(err: libvirt.libvirtError, host: str, parsed: hosturi.HostUri | None = None,
                   ssh_log: str | None = None, uri: str = "") -> AppError:
    if parsed is not None and ssh_log:
        ssh = _ssh_error(parsed, ssh_log, host, uri)
        if ssh is not None:
            ssh.cause = err
            return ssh
    app = classify_libvirt_error(err, host=host, operation="connect")
    if app.code in (ErrorCode.LIBVIRT_ERROR, ErrorCode.VM_NOT_FOUND, ErrorCode.LIBVIRT_TIMEOUT):
        return AppError(ErrorCode.HOST_UNREACHABLE, app.message, app.context, cause=err)
    return app


class HostPool:
    """host name → HostConnection; a connection is replaced when its options change.

    Lookup and replacement happen without an await in between, so concurrent callers always agree on
    one HostConnection per host (which itself connects once, single-flight); a replaced one is closed
    once its running calls return.

    A host removed as deleted stays refused until `exists` says a LibvirtHost of that name is there
    again: a reconcile that read the host before its deletion would otherwise open a new connection
    to it, which nobody closes (no daemon of that host is left) and which would keep serving it."""

    def __init__(self) -> None:
        self._hosts: dict[str, HostConnection] = {}
        self._deleted: set[str] = set()

    def get(self, name: str) -> HostConnection | None:
        return self._hosts.get(name)

    def names(self) -> list[str]:
        return list(self._hosts)

    async def ensure(self, name: str, options: ConnectOptions) -> HostConnection:
        if name in self._deleted:
            raise AppError(ErrorCode.HOST_NOT_FOUND, f"LibvirtHost {name} was deleted", {"host": name})
        current = self._hosts.get(name)
        if current is not None and current.options == options and not current.closed:
            return current
        conn = self._hosts[name] = HostConnection(name, options)
        if current is not None:
            await current.close()  # never blocks: retires it (closed when idle)
        return conn

    async def remove(self, name: str, *, deleted: bool = False) -> None:
        if deleted:
            self._deleted.add(name)
        conn = self._hosts.pop(name, None)
        if conn is not None:
            await conn.close(abort=True)

    def exists(self, name: str) -> None:
        """A LibvirtHost of this name exists (again, after a deletion): connections may be opened."""
        self._deleted.discard(name)

    async def close_all(self) -> None:
        for name in list(self._hosts):
            await self.remove(name)
