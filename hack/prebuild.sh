#!/usr/bin/env bash
# Start the slow builds that only the suite's last tests need (helm, the test cluster's kubelet,
# kube-scheduler and kube-controller-manager, the operator image) in the background, at the lowest
# CPU and I/O priority, while the suite runs: a cold run overlaps them with the tests instead of
# paying them in a row. The tests call the same scripts; each holds a lock while it builds, so a test
# that needs a build still running waits for it and then finds it cached. With warm caches every step
# returns at once. Output: ${LIBVIRT_OPERATOR_CACHE:-$HOME/.cache/libvirt-operator}/prebuild.log
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${LIBVIRT_OPERATOR_CACHE:-${HOME}/.cache/libvirt-operator}"
mkdir -p "${cache}"
log="${cache}/prebuild.log"

# Without root or Go the cluster tests skip (or, in CI, fail saying why): nothing to prepare.
[[ "$(id -u)" -eq 0 ]] || exit 0
command -v go >/dev/null 2>&1 || exit 0

steps=("${here}/ensure-helm.sh")  # first: the chart tests need it early
[[ -n "${LIBVIRT_OPERATOR_E2E_KUBECONFIG:-}" ]] || steps+=("${here}/ensure-cluster-binaries.sh")
if [[ -z "${LIBVIRT_OPERATOR_E2E_IMAGE:-}" ]] && command -v buildah >/dev/null 2>&1; then
  steps+=("${here}/image/build.sh")
fi

low=()
command -v nice >/dev/null 2>&1 && low+=(nice -n 19)
command -v ionice >/dev/null 2>&1 && low+=(ionice -c 3)
(
  for step in "${steps[@]}"; do
    echo "== $(date -u +%H:%M:%S) ${step#"${here}/"}"
    "${low[@]}" bash "${step}" >/dev/null || echo "== ${step#"${here}/"} failed ($?): the test that needs it runs it again"
  done
  echo "== $(date -u +%H:%M:%S) done"
) </dev/null >>"${log}" 2>&1 &
disown
echo "prebuild: ${#steps[@]} builds started in the background (log: ${log})" >&2
