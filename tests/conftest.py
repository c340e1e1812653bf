import sys
from pathlib import Path

# Make the repo root importable so that `tests.harness` resolves (tests/ is a namespace package).
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

pytest_plugins = [
    "tests.harness.pytest_controlplane",
    "tests.harness.pytest_cluster",
    "tests.harness.pytest_libvirt",
    "tests.harness.pytest_operator",
    "tests.harness.pytest_prometheus",
    "tests.harness.pytest_rag",
]
