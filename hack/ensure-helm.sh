#!/usr/bin/env bash
# Ensure a helm binary for the chart tests, built from the pinned builder module hack/helm
# (go.mod/go.sum pin helm.sh/helm/v3) and cached under
#   ${LIBVIRT_OPERATOR_CACHE:-$HOME/.cache/libvirt-operator}/helm/<key>/helm
# <key> hashes the builder's go.mod + go.sum and the Go version. The LAST stdout line is the
# binary's path. Progress goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
builder="${here}/helm"
command -v go >/dev/null 2>&1 || { echo "ensure-helm: 'go' not found in PATH" >&2; exit 127; }
export GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0 GOWORK=off
unset GOOS GOARCH

# The Kubernetes version helm assumes without --kube-version (Capabilities.KubeVersion, checked against
# Chart.yaml's kubeVersion, and the deprecation lint): that of the client-go helm is built with, set
# the way helm's own Makefile does (a plain `go build` leaves helm's default, v1.20).
k8s_minor="$(grep -oE "k8s.io/client-go v0\.[0-9]+" "${builder}/go.mod" | head -1 | cut -d. -f3)"
[[ -n "${k8s_minor}" ]] || { echo "ensure-helm: no k8s.io/client-go version in ${builder}/go.mod" >&2; exit 1; }
k8s_flags=""
for pkg in chartutil lint/rules; do
  k8s_flags+=" -X helm.sh/helm/v3/pkg/${pkg}.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/${pkg}.k8sVersionMinor=${k8s_minor}"
done
key="$( { go env GOVERSION GOOS GOARCH; cat "${builder}/go.mod" "${builder}/go.sum"; echo "${k8s_flags}"; } | sha256sum | cut -c1-16)"
cache_root="${LIBVIRT_OPERATOR_CACHE:-${HOME}/.cache/libvirt-operator}/helm"
dest="${cache_root}/${key}"
if [[ -x "${dest}/helm" ]]; then echo "${dest}/helm"; exit 0; fi

mkdir -p "${cache_root}"
exec 9>"${cache_root}/.lock"
command -v flock >/dev/null 2>&1 && flock 9
if [[ -x "${dest}/helm" ]]; then echo "${dest}/helm"; exit 0; fi
tmp="$(mktemp -d "${cache_root}/.build.XXXXXX")"
trap 'rm -rf "${tmp}"' EXIT
version="$(grep -oE "helm.sh/helm/v3 v[0-9.]+" "${builder}/go.mod" | head -1 | cut -d" " -f2)"
echo "ensure-helm: building helm ${version} into ${dest}" >&2
start=$(date +%s)
(cd "${builder}" && go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=${version}${k8s_flags}" \
  -o "${tmp}/helm" helm.sh/helm/v3/cmd/helm)
echo "ensure-helm: built in $(( $(date +%s) - start ))s" >&2
chmod 0755 "${tmp}"
rm -rf "${dest}"
mv -T "${tmp}" "${dest}"
trap - EXIT
echo "${dest}/helm"
