#!/bin/bash
# Build the operator image from the repository's Dockerfile with buildah, without any registry:
#
#   1. a Python base image made with debootstrap (Debian bookworm minbase + python3), imported into
#      buildah's storage as localhost/python:3.11-slim-bookworm-<basekey12>; cached by its package
#      list + recipe version (+ the host's extra CA certificates it carries);
#   2. the knowledge-base index built OUTSIDE the image with the repository's .venv (which has torch
#      and sentence-transformers already) and handed to the build as the `kb-index` build context
#      (Dockerfile: KB_INDEX=prebuilt), so the image build installs no torch at all;
#   3. `buildah bud` of the Dockerfile, pushed to a docker-archive tar; cached by a content hash of
#      Dockerfile + pyproject.toml + README.md + operator/ + rag/ + this recipe (+ the base key).
#
# Output: ${LIBVIRT_OPERATOR_CACHE:-$HOME/.cache/libvirt-operator}/image/<key>/libvirt-operator.tar
# holding the image localhost/libvirt-operator:<key12>. The LAST line on stdout is
#   <tar path> <image name>
# (import it with `ctr -n k8s.io images import <tar path>`); progress goes to stderr.
# A second run with nothing changed prints the cached line in about a second.
#
# Host facts are read at run time, never written into the repository: the Debian mirror from
# /etc/apt/sources.list*, pip's index settings (environment, `pip config list`), the extra CA
# certificates in /usr/local/share/ca-certificates (outbound HTTPS may go through an intercepting
# proxy: the base image trusts them).
#
# Needs root (debootstrap, buildah's chroot isolation), buildah, debootstrap and `make setup`'s .venv.
# Environment: LIBVIRT_OPERATOR_CACHE (cache root), IMAGE_FORCE=1 (rebuild the operator image even
# when cached).
set -euo pipefail

BASE_RECIPE=1      # bump when the base image recipe below changes
IMAGE_RECIPE=1     # bump when the build steps change in a way the content hash cannot see
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,python3-dev,python-is-python3,ca-certificates
IMAGE_REPO=localhost/libvirt-operator

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${LIBVIRT_OPERATOR_CACHE:-$HOME/.cache/libvirt-operator}"
WORK="$CACHE/image"
VENV="${VENV:-$ROOT/.venv}"

log() { printf '[image %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, buildah with chroot isolation)"
for tool in buildah debootstrap flock python3 sha256sum; do
    command -v "$tool" >/dev/null || die "$tool is missing (hack/install-system-deps.sh installs it)"
done

mkdir -p "$WORK"
exec 9>"$WORK/.lock"
flock 9   # one build at a time per cache; a waiting run then finds the finished image

# ---------------------------------------------------------------------------------------------
# buildah configuration: everything under the cache, cgroupfs (no systemd here), no registries.
# ---------------------------------------------------------------------------------------------
CONF="$WORK/containers"
mkdir -p "$CONF" "$WORK/storage" "$WORK/run"
cat >"$CONF/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
EOF
cat >"$CONF/containers.conf" <<'EOF'
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
cat >"$CONF/registries.conf" <<'EOF'
unqualified-search-registries = []
short-name-mode = "disabled"
EOF
printf '{"default": [{"type": "insecureAcceptAnything"}]}\n' >"$CONF/policy.json"
export CONTAINERS_CONF="$CONF/containers.conf"
export CONTAINERS_STORAGE_CONF="$CONF/storage.conf"
export CONTAINERS_REGISTRIES_CONF="$CONF/registries.conf"
export BUILDAH_ISOLATION=chroot
POLICY=(--signature-policy "$CONF/policy.json")

image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }

# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------
CA_FILES=()
for f in /usr/local/share/ca-certificates/*.crt; do [ -f "$f" ] && CA_FILES+=("$f"); done
BASE_KEY="$( { echo "base-recipe=$BASE_RECIPE suite=$SUITE packages=$BASE_PACKAGES"
               [ ${#CA_FILES[@]} -eq 0 ] || sha256sum "${CA_FILES[@]}" | cut -d' ' -f1; } | sha256sum | cut -c1-64)"
BASE_IMAGE="localhost/python:3.11-slim-$SUITE-${BASE_KEY:0:12}"

cd "$ROOT"
UPSTREAM_DOCS="$(dpkg-query -W -f '${Package}=${Version}' libvirt-doc 2>/dev/null || echo none)"
KEY="$( { echo "image-recipe=$IMAGE_RECIPE base=$BASE_KEY upstream-docs=$UPSTREAM_DOCS"
          python3 "$HERE/hostcfg.py" tree-hash Dockerfile .dockerignore pyproject.toml README.md \
              operator rag hack/image/build.sh hack/image/hostcfg.py; } | sha256sum | cut -c1-64)"
IMAGE="$IMAGE_REPO:${KEY:0:12}"
OUT_DIR="$WORK/$KEY"
TAR="$OUT_DIR/libvirt-operator.tar"

if [ -s "$TAR" ] && [ "${IMAGE_FORCE:-0}" != 1 ]; then
    log "cached: $IMAGE"
    echo "$TAR $IMAGE"
    exit 0
fi

T0=$(date +%s)

# ---------------------------------------------------------------------------------------------
# 1. The Python base image (debootstrap)
# ---------------------------------------------------------------------------------------------
build_base() {
    local mirrors debian security root ctr mnt
    mirrors="$(python3 "$HERE/hostcfg.py" apt-mirrors)"
    debian="${mirrors%% *}"; security="${mirrors##* }"
    root="$WORK/base-rootfs.$$"
    rm -rf "$WORK"/base-rootfs.*; mkdir -p "$root"   # (leftovers of a failed run: we hold the lock)
    log "base: debootstrap --variant=minbase $SUITE (mirror from the host's apt sources)"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$root" "$debian" \
        >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
    cat >"$root/etc/apt/sources.list" <<EOF
deb $debian $SUITE main
deb $debian $SUITE-updates main
deb $security $SUITE-security main
EOF
    if [ ${#CA_FILES[@]} -gt 0 ]; then
        cp "${CA_FILES[@]}" "$root/usr/local/share/ca-certificates/"
        chroot "$root" update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates failed in the base"
    fi
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log \
           "$root"/var/cache/debconf/*-old "$root"/dev/* "$root"/proc/* "$root"/sys/* \
           "$root"/debootstrap
    ctr="$(buildah from "${POLICY[@]}" scratch)"
    mnt="$(buildah mount "$ctr")"
    tar -C "$root" --numeric-owner -cf - . | tar -C "$mnt" --numeric-owner -xpf -
    buildah umount "$ctr" >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd python3 \
        --label "org.opencontainers.image.description=debootstrap $SUITE minbase + $BASE_PACKAGES" \
        --label "io.libvirt-operator.base-key=$BASE_KEY" "$ctr"
    buildah commit "${POLICY[@]}" --rm -q "$ctr" "$BASE_IMAGE" >/dev/null
    buildah tag "$BASE_IMAGE" "localhost/python:3.11-slim-$SUITE"
    rm -rf "$root"
}

if image_exists "$BASE_IMAGE"; then
    log "base: cached $BASE_IMAGE"
else
    tb=$(date +%s)
    build_base
    log "base: built $BASE_IMAGE in $(( $(date +%s) - tb )) s"
fi

# ---------------------------------------------------------------------------------------------
# 2. The knowledge-base index, built with the repository's .venv (torch stays outside the image)
# ---------------------------------------------------------------------------------------------
[ -x "$VENV/bin/libvirt-operator" ] || die "$VENV/bin/libvirt-operator is missing: run \`make setup\` first"
KB_DB="$WORK/kb/rag-db"          # persistent: `rag index` is incremental
KB_CTX="$WORK/kb/context.$$"
tk=$(date +%s)
log "kb: indexing rag/ (+ libvirt-doc) with $VENV"
mkdir -p "$KB_DB"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LIBVIRT_OPERATOR_RAG_DIR="$ROOT/rag" \
    "$VENV/bin/libvirt-operator" rag index --rag-dir "$ROOT/rag" --db "$KB_DB" --json >"$WORK/kb/index.json" \
    || die "rag index failed"
rm -rf "$KB_CTX"; mkdir -p "$KB_CTX"
# The runtime reads only the snapshot and the ONNX query model (no LanceDB in the image).
cp -a "$KB_DB/snapshot.npz" "$KB_DB/model" "$KB_CTX/"
log "kb: ready in $(( $(date +%s) - tk )) s ($(du -sh "$KB_CTX" | cut -f1))"

# ---------------------------------------------------------------------------------------------
# 3. The operator image
# ---------------------------------------------------------------------------------------------
mapfile -t PIP_ARGS < <(python3 "$HERE/hostcfg.py" pip-args)
log "image: buildah bud $IMAGE (base $BASE_IMAGE, KB_INDEX=prebuilt); df: $(df -h --output=avail "$WORK" | tail -1 | tr -d ' ') free"
ti=$(date +%s)
cleanup() { rm -rf "$KB_CTX" "$TAR.tmp"; }
trap cleanup EXIT
buildah bud "${POLICY[@]}" --isolation chroot --network host --layers --force-rm \
    --build-arg "PYTHON_IMAGE=$BASE_IMAGE" --build-arg KB_INDEX=prebuilt "${PIP_ARGS[@]}" \
    --build-context "kb-index=$KB_CTX" \
    -f "$ROOT/Dockerfile" -t "$IMAGE" "$ROOT" >&2 || die "buildah bud failed"
log "image: built in $(( $(date +%s) - ti )) s"

mkdir -p "$OUT_DIR"
rm -f "$TAR.tmp"
buildah push "${POLICY[@]}" -q "$IMAGE" "docker-archive:$TAR.tmp:$IMAGE" >&2 || die "buildah push to docker-archive failed"
mv "$TAR.tmp" "$TAR"
touch "$OUT_DIR"
# Keep the newest KEEP archives (and their tagged images); buildah's layer cache stays.
KEEP=3
for old in $(ls -1dt "$WORK"/[0-9a-f]*/ 2>/dev/null | grep -E '/[0-9a-f]{64}/$' | tail -n +$((KEEP + 1))); do
    old_key="$(basename "$old")"
    buildah rmi "$IMAGE_REPO:${old_key:0:12}" >/dev/null 2>&1 || true
    rm -rf "$old"
done
log "image: $IMAGE, archive $(du -h "$TAR" | cut -f1), total $(( $(date +%s) - T0 )) s"
echo "$TAR $IMAGE"
