"""Bridge libvirt's event loop onto asyncio (libvirtaio), so lifecycle callbacks arrive on the loop."""

from __future__ import annotations

import asyncio

import libvirtaio

_registered: asyncio.AbstractEventLoop | None = None


def register_event_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Must run inside the loop before the first connection is opened; idempotent per loop."""
    global _registered
    if _registered is loop:
        return
    libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
    _registered = loop
