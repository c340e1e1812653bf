"""pytest plugin: simulated libvirt hosts and a bootable test ISO.

Enable with ``pytest_plugins = ["tests.harness.pytest_libvirt"]`` in the top-level
``tests/conftest.py`` (or in a test module).

Fixtures:
  test_host_factory -- function scope; ``make(name="host", *, cpus=2, memory_mib=4096, ...)``
                       writes a test-driver host file under ``tmp_path`` and returns its
                       ``test:///abs/path.xml`` URI (keyword arguments as
                       :func:`tests.harness.libvirt_hosts.write_test_host`)
  libvirtd          -- session scope; one real :class:`LibvirtDaemon` (``.uri``, ``.root``,
                       ``.pool_path``) shared by the session
  libvirtd_factory  -- session scope; ``factory(name=None, **kw)`` starts another daemon,
                       ``factory.many(n)`` starts ``n`` at once; all stop at session end
  test_iso          -- session scope; ``BootIso(path, markers)`` (a NamedTuple: unpacks to the
                       ISO path and the two serial-console markers it prints when it boots)

A missing prerequisite (not root, packages missing, no ``libvirt`` module) skips the test,
except under ``CI=true`` where it fails: CI must run these (``unavailable(what, reason)``, for
other harness prerequisites too). ``LIBVIRT_OPERATOR_KEEP_HOSTS=1``
keeps the daemons' directories (configs, logs) after the session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import pytest

from tests.harness.libvirt_hosts import (
    LibvirtDaemon,
    libvirtd_available,
    start_all,
    write_test_host,
)
from tests.harness.test_iso import build_test_iso, iso_build_available


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def unavailable(what: str, reason: str) -> NoReturn:
    """Skip the test for a missing prerequisite; fail it under ``CI=true``."""
    if _in_ci():
        pytest.fail(f"{what} unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"{what} unavailable: {reason}")


def _require_libvirt_python() -> None:
    try:
        import libvirt  # noqa: F401
    except ImportError as exc:
        unavailable("libvirt-python", str(exc))


class BootIso(NamedTuple):
    path: Path
    markers: tuple[str, str]


class TestHostFactory:
    """Writes test-driver host files into one directory; call it to get a ``test:///`` URI."""

    __test__ = False  # not a test class

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.uris: dict[str, str] = {}

    def __call__(
        self,
        name: str = "host",
        *,
        cpus: int = 2,
        memory_mib: int = 4096,
        pools: Sequence[str] = ("default",),
        domains: Sequence[str | Mapping[str, Any]] = (),
        network: bool = False,
        **kwargs: Any,
    ) -> str:
        if name in self.uris:
            raise ValueError(f"test host {name!r} already made")
        uri = write_test_host(
            self.directory / f"{name}.xml",
            name=name,
            cpus=cpus,
            memory_mib=memory_mib,
            pools=pools,
            domains=domains,
            network=network,
            **kwargs,
        )
        self.uris[name] = uri
        return uri


@pytest.fixture
def test_host_factory(tmp_path: Path) -> TestHostFactory:
    _require_libvirt_python()
    directory = tmp_path / "test-hosts"
    directory.mkdir(exist_ok=True)
    return TestHostFactory(directory)


class LibvirtdFactory:
    """Starts real daemons on demand and remembers them for teardown at session end."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self.daemons: list[LibvirtDaemon] = []
        self._count = 0

    def _new(self, name: str | None, kwargs: dict[str, Any]) -> LibvirtDaemon:
        self._count += 1
        name = name or f"host{self._count}"
        root = self._tmp.mktemp(f"libvirtd-{name}-", numbered=True)
        d = LibvirtDaemon(name=name, root=root, **kwargs)
        self.daemons.append(d)
        return d

    def __call__(self, name: str | None = None, **kwargs: Any) -> LibvirtDaemon:
        d = self._new(name, kwargs)
        d.start()
        return d

    def many(self, count: int, **kwargs: Any) -> list[LibvirtDaemon]:
        """Start ``count`` daemons concurrently (see :func:`libvirt_hosts.start_all`)."""
        daemons = [self._new(None, dict(kwargs)) for _ in range(count)]
        start_all(daemons)
        return daemons

    def stop_all(self) -> None:
        errors = []
        for d in reversed(self.daemons):
            try:
                d.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(f"{d!r}: {exc}")
        self.daemons.clear()
        if errors:
            raise RuntimeError("stopping libvirt daemons failed:\n" + "\n".join(errors))


@pytest.fixture(scope="session")
def libvirtd_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtdFactory]:
    ok, reason = libvirtd_available()
    if not ok:
        unavailable("libvirtd", reason)
    factory = LibvirtdFactory(tmp_path_factory)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(scope="session")
def libvirtd(libvirtd_factory: LibvirtdFactory) -> LibvirtDaemon:
    return libvirtd_factory("main")


@pytest.fixture(scope="session")
def test_iso(tmp_path_factory: pytest.TempPathFactory) -> BootIso:
    ok, reason = iso_build_available()
    if not ok:
        unavailable("test ISO build", reason)
    path, markers = build_test_iso(tmp_path_factory.mktemp("test-iso"))
    return BootIso(path, markers)

