"""Real libvirt errors, raised by a real libvirtd and by the test driver, classify to catalog codes."""

from __future__ import annotations

import pytest

from libvirt_operator.adapters.libvirt import ConnectOptions, HostPool
from libvirt_operator.core.errors import AppError, ErrorCode

CASES = [
    ("missing domain", lambda c: c.lookupByName("no-such-domain"), ErrorCode.VM_NOT_FOUND),
    ("missing pool", lambda c: c.storagePoolLookupByName("no-such-pool"), ErrorCode.STORAGE_POOL_NOT_FOUND),
    ("missing network", lambda c: c.networkLookupByName("no-such-net"), ErrorCode.NETWORK_NOT_FOUND),
    ("malformed XML", lambda c: c.defineXML("<domain type='qemu'><name>x</name>"), ErrorCode.INVALID_SPEC),
    ("unknown domain type", lambda c: c.defineXML(
        "<domain type='xen-nope'><name>x</name><memory>65536</memory><os><type>hvm</type></os></domain>"),
     ErrorCode.INVALID_SPEC),
]


async def _classify(uri: str, fn) -> AppError:
    pool = HostPool()
    conn = await pool.ensure("real", ConnectOptions(uri=uri))
    try:
        with pytest.raises(AppError) as info:
            await conn.call("case", fn)
        return info.value
    finally:
        await pool.close_all()


@pytest.mark.parametrize("what,fn,code", CASES, ids=[c[0] for c in CASES])
async def test_real_libvirtd_errors(libvirtd, what, fn, code) -> None:
    err = await _classify(libvirtd.uri, fn)
    assert err.code == code, f"{what}: {err.message} ({err.context})"
    assert err.context["libvirtCode"].startswith("VIR_ERR_")


@pytest.mark.parametrize("what,fn,code", CASES[:3], ids=[c[0] for c in CASES[:3]])
async def test_test_driver_errors(what, fn, code) -> None:
    err = await _classify("test:///default", fn)
    assert err.code == code, f"{what}: {err.message}"


async def test_refused_connection_is_host_unreachable() -> None:
    err = await _classify("qemu+tcp://127.0.0.1:1/system", lambda c: c.getHostname())
    assert err.code == ErrorCode.HOST_UNREACHABLE
    assert "127.0.0.1:1" in err.message
