"""LibvirtHost connection URIs: a strict parser and the policy the operator enforces (pure).

A libvirt URI is powerful: query parameters name files (`keyfile`, `known_hosts`, `pkipath`),
sockets (`socket`), programs (`command`, `netcat`), turn verification off (`no_verify`,
`known_hosts_verify=ignore`), and `test:///<path>` makes the operator read any file in its pod.
Users only choose the transport, the user, the host, the port, the path (`/system`, `/session`)
and two harmless knobs (`mode`, `proxy`); credentials and verification come from the Secret and
are set by the operator alone. The CRD's CEL rules (core/api/host.py) refuse the same URIs at
admission; this module is the authoritative check at reconcile.

libvirt's own parser matches parameter names case-insensitively, unescapes `%xx` in names and
values and splits on both `&` and `;`: the grammar here therefore admits only lower-case names,
enumerated values and `&`, so no spelling of a forbidden parameter gets through.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import urllib.parse
from collections.abc import Callable, Sequence

# Transports users may name. qemu+ext (runs `command=`) is not among them.
TRANSPORTS = ("", "ssh", "libssh", "libssh2", "tls", "tcp", "unix")
SSH_TRANSPORTS = ("ssh", "libssh", "libssh2")
# The only query parameters users may set, with their only values (libvirt 9: remote driver).
ALLOWED_PARAMS: dict[str, tuple[str, ...]] = {
    "mode": ("auto", "legacy"),  # direct: local sockets only, and libvirt refuses it over ssh
    "proxy": ("auto", "netcat", "native"),
}
QEMU_PATHS = ("/system", "/session")
TEST_DEFAULT = "/default"

_SCHEME = re.compile(r"^(qemu(\+[a-z0-9]+)?|test)$")
_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$")
_IPV6 = re.compile(r"^\[[0-9A-Fa-f:.]+\]$")
_PARAM = re.compile(r"^([a-z_]+)=([a-z0-9]+)$")
_TEST_PATH = re.compile(r"^/[A-Za-z0-9._/-]+$")
_FORBIDDEN_CHARS = re.compile(r"[\s\x00-\x1f\x7f\\#%;\"'`<>{}|^]")


class HostUriError(ValueError):
    """The URI is refused; the message says why and never echoes anything but the URI's parts."""


@dataclasses.dataclass(frozen=True)
class HostUri:
    driver: str            # "qemu" or "test"
    transport: str         # "" (local socket, or TLS when a host is given), ssh, libssh, libssh2, tls, tcp, unix
    user: str | None
    host: str | None       # hostname, IPv4 or [IPv6]
    port: int | None
    path: str              # /system, /session, /default or the test driver's file
    params: tuple[tuple[str, str], ...] = ()

    @property
    def scheme(self) -> str:
        return f"{self.driver}+{self.transport}" if self.transport else self.driver

    @property
    def ssh(self) -> bool:
        return self.transport in SSH_TRANSPORTS

    @property
    def tls(self) -> bool:
        return self.transport == "tls" or (self.driver == "qemu" and not self.transport and bool(self.host))

    @property
    def local(self) -> bool:
        return self.driver == "qemu" and self.transport in ("", "unix") and not self.host

    @property
    def test_file(self) -> str | None:
        """The host file the test driver reads, or None for test:///default and qemu URIs."""
        return self.path if self.driver == "test" and self.path != TEST_DEFAULT else None

    @property
    def endpoint(self) -> str:
        """host[:port] for messages (never the user or parameters)."""
        return f"{self.host}:{self.port}" if self.port else (self.host or "localhost")

    def render(self, extra: Sequence[tuple[str, str]] = ()) -> str:
        """The URI for libvirt: the user's parts plus parameters only the operator may set."""
        netloc = ""
        if self.user:
            netloc += f"{self.user}@"
        netloc += self.host or ""
        if self.port:
            netloc += f":{self.port}"
        query = urllib.parse.urlencode(list(self.params) + list(extra), safe="/")
        return f"{self.scheme}://{netloc}{self.path}" + (f"?{query}" if query else "")


def _refuse_param(name: str, value: str) -> HostUriError:
    allowed = ", ".join(f"{k} ({'|'.join(v)})" for k, v in ALLOWED_PARAMS.items())
    if name in ALLOWED_PARAMS:
        return HostUriError(f"query parameter {name} may only be {'|'.join(ALLOWED_PARAMS[name])}")
    return HostUriError(
        f"query parameter {name!r} is not allowed: keys, known_hosts, certificates, sockets, commands and "
        f"verification are set by the operator from credentialsSecretRef; allowed parameters: {allowed}")


def parse(uri: str) -> HostUri:
    """Parse and validate a LibvirtHost URI (grammar and allow-lists; no operator settings)."""
    if not isinstance(uri, str) or not uri:
        raise HostUriError("the URI is empty")
    if len(uri) > 2048:
        raise HostUriError("the URI is longer than 2048 characters")
    if not uri.isascii():
        raise HostUriError("the URI must be ASCII (no percent-encoding or non-ASCII characters)")
    bad = _FORBIDDEN_CHARS.search(uri)
    if bad:
        what = {"#": "a fragment (#)", "%": "percent-encoding (%)", ";": "';' (libvirt splits parameters on it)"}
        char = bad.group()
        raise HostUriError(f"the URI may not contain {what.get(char, repr(char))}")
    scheme, sep, rest = uri.partition("://")
    if not sep or not _SCHEME.match(scheme):
        raise HostUriError("the URI must start with qemu://, qemu+ssh://, qemu+libssh://, qemu+libssh2://, "
                           "qemu+tls://, qemu+tcp://, qemu+unix:// or test://")
    driver, _, transport = scheme.partition("+")
    if transport not in TRANSPORTS or (driver == "test" and transport):
        raise HostUriError(f"transport {scheme}:// is not allowed (allowed: qemu, qemu+ssh, qemu+libssh, "
                           "qemu+libssh2, qemu+tls, qemu+tcp with insecure: true, qemu+unix, test)")
    authority, slash, path_query = rest.partition("/")
    path, qmark, query = (slash + path_query).partition("?")
    if qmark and not query:
        raise HostUriError("the URI ends with an empty query ('?')")
    user, host, port = _authority(authority)
    params = _params(query) if qmark else ()
    if driver == "test":
        if authority:
            raise HostUriError("test:// URIs name a local file: write test:///default or test:///abs/path.xml, "
                               "without a host")
        if params:
            raise HostUriError("test:// URIs take no query parameters")
        return HostUri(driver, "", None, None, None, _test_path(path))
    if path not in QEMU_PATHS:
        raise HostUriError(f"the path must be /system or /session, not {path or '(empty)'!r}")
    if transport == "unix" and authority:
        raise HostUriError("qemu+unix:// reaches the operator's own node: no user or host")
    if transport in ("ssh", "libssh", "libssh2", "tls", "tcp") and not host:
        raise HostUriError(f"{scheme}:// needs a host, e.g. {scheme}://root@kvm-01.example.com/system")
    if not transport and not host and (user or port):
        raise HostUriError("qemu:/// (the local socket) takes no user or port")
    if params and not host:
        raise HostUriError("query parameters are only meaningful for remote hosts")
    return HostUri(driver, transport, user, host, port, path, params)


def _authority(authority: str) -> tuple[str | None, str | None, int | None]:
    if not authority:
        return None, None, None
    user = None
    if "@" in authority:
        user, _, authority = authority.rpartition("@")
        if ":" in user:
            raise HostUriError("the URI may not carry a password (user:password@): use credentialsSecretRef")
        if not _USER.match(user):
            raise HostUriError("the user name may contain only letters, digits, '.', '_' and '-'")
    host, port = authority, None
    if authority.startswith("["):
        end = authority.find("]")
        host, tail = authority[:end + 1], authority[end + 1:]
        if end < 0 or not _IPV6.match(host):
            raise HostUriError("invalid IPv6 address in the URI")
        if tail:
            if not tail.startswith(":"):
                raise HostUriError("invalid host in the URI")
            port = _port(tail[1:])
    elif ":" in authority:
        host, _, port_text = authority.rpartition(":")
        port = _port(port_text)
    if not host:
        raise HostUriError("the URI has a user or port but no host")
    if not host.startswith("[") and (len(host) > 253 or not _HOSTNAME.match(host)):
        raise HostUriError("the host must be a DNS name, an IPv4 address or an [IPv6] address")
    return user, host, port


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536 or len(text) > 5:
        raise HostUriError("the port must be a number from 1 to 65535")
    return int(text)


def _params(query: str) -> tuple[tuple[str, str], ...]:
    seen: dict[str, str] = {}
    for item in query.split("&"):
        match = _PARAM.match(item)
        if match is None:
            name = item.partition("=")[0].lower()
            if name in ALLOWED_PARAMS or not name:
                raise HostUriError(f"query parameter {name or '(empty)'!r} is malformed: write name=value")
            raise _refuse_param(name, "")
        name, value = match.groups()
        if name not in ALLOWED_PARAMS or value not in ALLOWED_PARAMS[name]:
            raise _refuse_param(name, value)
        if name in seen:
            raise HostUriError(f"query parameter {name} is given twice")
        seen[name] = value
    return tuple(seen.items())


def _test_path(path: str) -> str:
    if path == TEST_DEFAULT:
        return path
    if not _TEST_PATH.match(path) or posixpath.normpath(path) != path or path.startswith("//"):
        raise HostUriError("a test driver URI is test:///default or test:///abs/path.xml "
                           "(a normalised absolute path: no '..', '.', '//' or special characters)")
    if not path.endswith(".xml"):
        raise HostUriError("a test driver host file must end in .xml")
    return path


def check_policy(parsed: HostUri, *, insecure: bool, allow_test_driver: bool,
                 test_driver_dirs: Sequence[str] = (),
                 realpath: Callable[[str], str] = os.path.realpath) -> None:
    """What the operator's settings and the LibvirtHost's `insecure` allow on top of the grammar."""
    if parsed.transport == "tcp" and not insecure:
        raise HostUriError("qemu+tcp:// is unauthenticated and unencrypted: set insecure: true to allow it, "
                           "or use qemu+tls:// or qemu+ssh://")
    if parsed.driver != "test":
        return
    if not allow_test_driver:
        raise HostUriError("test:// URIs (libvirt's test driver) are disabled on this operator: it was not "
                           "started with --allow-test-driver (meant for development and tests only)")
    path = parsed.test_file
    if path is None:
        return
    resolved = realpath(path)  # symlinks resolved: a link inside the directory may not lead out of it
    for directory in test_driver_dirs:
        if resolved.startswith(realpath(directory).rstrip("/") + "/"):
            return
    where = ", ".join(test_driver_dirs) or "none configured: only test:///default"
    raise HostUriError(f"test driver host files must be under a --test-driver-dir directory ({where})")


@dataclasses.dataclass(frozen=True)
class SecretKeys:
    """The Secret keys a transport needs (required) or can use (optional)."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    purpose: str = ""


def secret_keys(parsed: HostUri) -> SecretKeys | None:
    """Which credentialsSecretRef keys the URI's transport reads; None when it reads none."""
    if parsed.ssh:
        return SecretKeys(("ssh-privatekey", "known_hosts"), (),
                          f"{parsed.scheme}:// (the client key, and the host keys to verify {parsed.endpoint})")
    if parsed.tls:
        return SecretKeys(("ca.crt", "tls.crt", "tls.key"), (),
                          f"{parsed.scheme}:// (the CA that signed {parsed.endpoint}'s certificate, and the "
                          "client certificate and key)")
    return None


def missing_keys_message(secret: str, keys: SecretKeys, found: Sequence[str]) -> str | None:
    """A message naming the expected and the found keys (never values), or None if nothing is missing."""
    missing = [k for k in keys.required if k not in found]
    if not missing:
        return None
    found_text = ", ".join(sorted(found)) if found else "none"
    return (f"Secret {secret} has no key {', '.join(missing)} (credentialsSecretRef), needed for {keys.purpose}: "
            f"expected keys {', '.join(keys.required)}; found keys: {found_text}")
