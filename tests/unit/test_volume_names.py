"""Volume names for imported images: [a-z0-9-] only, bounded, unique per ISOImage and content."""

from __future__ import annotations

import pytest

from libvirt_operator.adapters.libvirt.volumes import MAX_NAME, VOLUME_NAME_RE, _check_name, volume_name
from libvirt_operator.core.errors import AppError

SHA = "sha256:" + "ab12" * 16


def test_shape() -> None:
    name = volume_name("default", "debian-12", SHA)
    assert name.startswith("iso-default-debian-12-") and name.endswith("-ab12ab12ab12ab12")
    assert VOLUME_NAME_RE.match(name)


@pytest.mark.parametrize("namespace,name", [
    ("ns", "../../etc/passwd"), ("ns", "a/b"), ("..", ".."), ("ns", "name.with.dots"),
    ("NS", "UPPER"), ("ns", "x" * 253), ("n" * 63, "y" * 253), ("ns", "ünïcode"), ("ns", "-lead-"),
])
def test_only_safe_characters(namespace: str, name: str) -> None:
    vol = volume_name(namespace, name, SHA)
    assert VOLUME_NAME_RE.match(vol), vol
    assert len(vol) <= MAX_NAME
    assert "/" not in vol and "." not in vol


def test_distinct_objects_get_distinct_names() -> None:
    names = {volume_name("a-b", "c", SHA), volume_name("a", "b-c", SHA), volume_name("a", "b.c", SHA),
             volume_name("ns", "x" * 200 + "1", SHA), volume_name("ns", "x" * 200 + "2", SHA)}
    assert len(names) == 5


def test_content_is_part_of_the_name() -> None:
    assert volume_name("ns", "n", SHA) != volume_name("ns", "n", "sha256:" + "cd34" * 16)
    assert volume_name("ns", "n", "sha512:" + "ef" * 64).endswith("-" + "ef" * 8)


def test_deterministic() -> None:
    assert volume_name("ns", "n", SHA) == volume_name("ns", "n", SHA)


def test_rejects_short_checksums() -> None:
    with pytest.raises(ValueError):
        volume_name("ns", "n", "sha256:ab")


@pytest.mark.parametrize("bad", ["../x", "a/b", "x.iso", "", "-x", "A", "a" * (MAX_NAME + 1)])
def test_adapter_refuses_unsafe_names(bad: str) -> None:
    with pytest.raises(AppError):
        _check_name(bad)
