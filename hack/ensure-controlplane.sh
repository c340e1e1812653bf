#!/usr/bin/env bash
# Ensure kube-apiserver and etcd binaries for the integration-test control plane.
#
# Builds them from source with the builder module hack/controlplane (go.mod/go.sum
# pin k8s.io/kubernetes and go.etcd.io/etcd/server/v3) and caches them under
#   ${LIBVIRT_OPERATOR_CACHE:-$HOME/.cache/libvirt-operator}/controlplane/<key>/
# where <key> hashes the builder's go.mod + go.sum, the Go version, GOOS/GOARCH and
# the build recipe below.  Idempotent and safe to run concurrently (flock).
#
# All progress goes to stderr; the LAST line on stdout is the directory holding
# `kube-apiserver` and `etcd`.
#
# A cold build needs Go >= 1.24, the Go module proxy (or a warm module cache),
# ~1.5 GB of module cache + ~1.5 GB of build cache, and several minutes on 2 cores.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
builder="${here}/controlplane"

if ! command -v go >/dev/null 2>&1; then
  echo "ensure-controlplane: 'go' not found in PATH (Go >= 1.24 is needed to build kube-apiserver/etcd)" >&2
  exit 127
fi

# Module mode with the committed go.sum: never rewrite go.mod/go.sum, never use a
# vendor dir; no VCS stamping (the builder is not the main repo's module root).
export GOFLAGS="-mod=readonly -buildvcs=false"
export CGO_ENABLED=0
unset GOOS GOARCH GOWORK
export GOWORK=off

# Recipe version: bump when the build commands below change meaningfully.
recipe=1
kube_version="$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "${builder}/go.mod")"
etcd_version="$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2; exit }' "${builder}/go.mod")"
if [[ ! "${kube_version}" =~ ^v1\.([0-9]+)\.[0-9]+$ ]]; then
  echo "ensure-controlplane: cannot find k8s.io/kubernetes version in ${builder}/go.mod" >&2
  exit 1
fi
kube_minor="${BASH_REMATCH[1]}"

go_version="$(go env GOVERSION)"
goos="$(go env GOOS)"
goarch="$(go env GOARCH)"
key="$(
  {
    echo "recipe=${recipe} go=${go_version} ${goos}/${goarch}"
    cat "${builder}/go.mod" "${builder}/go.sum"
  } | sha256sum | cut -c1-16
)"
cache_root="${LIBVIRT_OPERATOR_CACHE:-${HOME}/.cache/libvirt-operator}/controlplane"
dest="${cache_root}/${key}"

have_binaries() { [[ -x "${dest}/kube-apiserver" && -x "${dest}/etcd" ]]; }

if have_binaries; then
  echo "${dest}"
  exit 0
fi

mkdir -p "${cache_root}"
# Serialise concurrent builders (e.g. parallel test workers); re-check after locking.
exec 9>"${cache_root}/.lock"
if command -v flock >/dev/null 2>&1 && ! flock -n 9; then
  echo "ensure-controlplane: another build is running; waiting for ${cache_root}/.lock" >&2
  flock 9
fi
if have_binaries; then
  echo "${dest}"
  exit 0
fi

tmp="$(mktemp -d "${cache_root}/.build.XXXXXX")"
trap 'rm -rf "${tmp}"' EXIT

echo "ensure-controlplane: building kube-apiserver ${kube_version} and etcd ${etcd_version} with ${go_version} into ${dest} (takes minutes when cold)" >&2
start=$(date +%s)
cd "${builder}"
go build -trimpath -tags selinux,notest \
  -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=${kube_version} -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${kube_minor} -X k8s.io/component-base/version.gitTreeState=clean" \
  -o "${tmp}/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
go build -trimpath -ldflags "-s -w" -o "${tmp}/etcd" go.etcd.io/etcd/server/v3
"${tmp}/kube-apiserver" --version >&2
"${tmp}/etcd" --version >&2
echo "ensure-controlplane: built in $(( $(date +%s) - start ))s" >&2

# Publish atomically: the directory appears complete or not at all.
chmod 0755 "${tmp}"
rm -rf "${dest}"
mv -T "${tmp}" "${dest}"
trap - EXIT
echo "${dest}"
