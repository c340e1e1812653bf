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

# The modules that need the operator image and the single-node cluster run last: `make test` starts
# those builds in the background (hack/prebuild.sh), so on a cold machine they are ready by then.
RUN_LAST = ("tests/integration/test_image.py", "tests/e2e/test_cluster.py", "tests/e2e/test_helm.py")


def pytest_collection_modifyitems(session, config, items) -> None:  # noqa: ARG001
    def rank(item) -> int:
        path = Path(str(item.fspath)).resolve().relative_to(Path(_ROOT)).as_posix()
        return RUN_LAST.index(path) + 1 if path in RUN_LAST else 0

    items.sort(key=rank)  # stable: every other test keeps its order
