#!/usr/bin/env bash
# Ensure kubelet, kube-scheduler and kube-controller-manager for the single-node test cluster
# (tests/harness/cluster.py), built by the SAME builder module as kube-apiserver
# (hack/controlplane: one go.mod/go.sum, same Kubernetes version, same replace lines).
#
# Cached under ${LIBVIRT_OPERATOR_CACHE:-$HOME/.cache/libvirt-operator}/cluster/<key>/, where
# <key> hashes the builder's go.mod + go.sum, the Go version, GOOS/GOARCH and the recipe below.
# Idempotent and safe to run concurrently (flock). Progress goes to stderr; the LAST stdout line
# is the directory holding the three binaries. kube-apiserver and etcd come from
# hack/ensure-controlplane.sh. Cold: a few minutes on 2 cores (shares the Go build cache).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
builder="${here}/controlplane"
command -v go >/dev/null 2>&1 || { echo "ensure-cluster-binaries: 'go' not found in PATH" >&2; exit 127; }

export GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0 GOWORK=off
unset GOOS GOARCH

recipe=1
kube_version="$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "${builder}/go.mod")"
if [[ ! "${kube_version}" =~ ^v1\.([0-9]+)\.[0-9]+$ ]]; then
  echo "ensure-cluster-binaries: cannot find k8s.io/kubernetes version in ${builder}/go.mod" >&2
  exit 1
fi
kube_minor="${BASH_REMATCH[1]}"
key="$( { echo "recipe=${recipe} go=$(go env GOVERSION) $(go env GOOS)/$(go env GOARCH)"; cat "${builder}/go.mod" "${builder}/go.sum"; } | sha256sum | cut -c1-16)"
cache_root="${LIBVIRT_OPERATOR_CACHE:-${HOME}/.cache/libvirt-operator}/cluster"
dest="${cache_root}/${key}"
bins=(kubelet kube-scheduler kube-controller-manager)
have() { for b in "${bins[@]}"; do [[ -x "${dest}/${b}" ]] || return 1; done; }

if have; then echo "${dest}"; exit 0; fi
mkdir -p "${cache_root}"
exec 9>"${cache_root}/.lock"
if command -v flock >/dev/null 2>&1 && ! flock -n 9; then
  echo "ensure-cluster-binaries: another build is running; waiting for ${cache_root}/.lock" >&2
  flock 9
fi
if have; then echo "${dest}"; exit 0; fi

tmp="$(mktemp -d "${cache_root}/.build.XXXXXX")"
trap 'rm -rf "${tmp}"' EXIT
echo "ensure-cluster-binaries: building ${bins[*]} ${kube_version} into ${dest} (minutes when cold)" >&2
start=$(date +%s)
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=${kube_version} -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${kube_minor} -X k8s.io/component-base/version.gitTreeState=clean"
cd "${builder}"
for b in "${bins[@]}"; do
  go build -trimpath -tags selinux,notest -ldflags "${ldflags}" -o "${tmp}/${b}" "k8s.io/kubernetes/cmd/${b}"
  "${tmp}/${b}" --version >&2
done
echo "ensure-cluster-binaries: built in $(( $(date +%s) - start ))s" >&2
chmod 0755 "${tmp}"
rm -rf "${dest}"
mv -T "${tmp}" "${dest}"
trap - EXIT
echo "${dest}"
