"""Where an interrupted migration left the VM (reconcile.vm_migration.settled_host): decided only from
answers, never by guessing: a wrong "source" would define the VM a second time."""

from __future__ import annotations

import pytest

from libvirt_operator.reconcile.vm_migration import settled_host


@pytest.mark.parametrize(("on_target", "on_source", "expected"), [
    (True, False, "target"),     # libvirt switched: the target has it, the source undefined it
    (False, True, "source"),     # rolled back
    (False, False, "source"),    # nowhere: the normal path looks after it on its recorded host
    (True, True, "both"),        # the copy still runs: wait
    (None, False, "unknown"),    # the target does not answer and the source has nothing: it may run there
    (None, True, "unknown"),     # the target does not answer: it may have switched by now
    (True, None, "unknown"),     # the source does not answer: still copying, or switched
    (False, None, "source"),     # the target has nothing: it stays where it was
    (None, None, "unknown"),
])
def test_settled_host(on_target, on_source, expected) -> None:
    assert settled_host(on_target, on_source) == expected
