# syntax=docker/dockerfile:1
# libvirt-operator image: the operator with its runbook knowledge base, indexed at build time, so a
# pod answers with remediation links from its first reconcile. The runtime stage carries only the
# `kb` extra (onnxruntime, tokenizers, numpy): queries embed with the ONNX export stored next to the
# index; torch never reaches it. Runs as UID 10001 on a read-only root filesystem: it writes only
# to /tmp, $HOME (/home/operator) and the ISO cache (/var/cache/libvirt-operator), declared volumes.
#
# Two ways to get the knowledge-base index (KB_INDEX):
#
#   build (default) — the index is built inside the build stage with the `rag` extra (torch +
#     sentence-transformers). Works with a plain `docker build`, but the build stage is large
#     (PyPI's default torch wheel carries CUDA: several GB, ~10 min): point PIP_EXTRA_INDEX_URL at a
#     CPU-only PyTorch wheel index to keep it small.
#
#       docker build -t libvirt-operator:0.1.0 .
#       docker build --build-arg PYTHON_IMAGE=<your-mirror>/python:3.11-slim-bookworm \
#                    --build-arg PIP_INDEX_URL=<your-pypi-mirror>/simple -t libvirt-operator:0.1.0 .
#
#   prebuilt — the index comes from a build context named `kb-index` holding `snapshot.npz` and
#     `model/` of an index built outside the image (`libvirt-operator rag index --db DIR` in the
#     repository's .venv, which has torch already). The image build then installs no torch at all
#     (minutes instead of ~10, a few hundred MB of disk instead of ~30 GB at peak). hack/image/build.sh
#     does this with buildah; by hand, with BuildKit:
#
#       .venv/bin/libvirt-operator rag index --db /tmp/kb
#       docker build --build-arg KB_INDEX=prebuilt --build-context kb-index=/tmp/kb -t libvirt-operator:0.1.0 .
#
# The base is pinned by digest (python:3.11.10-slim-bookworm, multi-arch index digest as used by several
# public projects; not pulled here, where no registry is reachable); override with --build-arg PYTHON_IMAGE=….

ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm@sha256:5148c0e4bbb64271bca1d3322360ebf4bfb7564507ae32dd639322e4952a6b16
ARG KB_INDEX=build

# ------------------------------------------------------------------------------------------------
# build: the runtime virtualenv (/opt/runtime: the operator + the `kb` extra, no torch)
FROM ${PYTHON_IMAGE} AS build

ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# libvirt-python is built from source against the distribution's libvirt.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt-dev pkg-config gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Dependencies first (cached while only the source changes): the project's metadata with a stub package.
COPY pyproject.toml README.md ./
RUN python -m venv /opt/runtime \
 && /opt/runtime/bin/pip install --upgrade pip \
 && mkdir -p operator/libvirt_operator && touch operator/libvirt_operator/__init__.py \
 && /opt/runtime/bin/pip install '.[kb]' \
 && /opt/runtime/bin/pip uninstall -y libvirt-operator \
 && rm -rf operator build
COPY operator/ operator/
RUN /opt/runtime/bin/pip install --no-deps . \
 && rm -rf build \
 && ! /opt/runtime/bin/python -c 'import torch' 2>/dev/null
COPY rag/ /app/rag/

# ------------------------------------------------------------------------------------------------
# kb-build: the index built here, with torch in a separate virtualenv that never leaves this stage
FROM build AS kb-build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt-doc \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install '.[rag]'
RUN HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    /opt/venv/bin/libvirt-operator rag index --rag-dir /app/rag --db /tmp/rag-db \
 && mkdir -p /app/rag-db \
 && cp -a /tmp/rag-db/snapshot.npz /tmp/rag-db/model /app/rag-db/ \
 && rm -rf /tmp/rag-db

# kb-prebuilt: the index built outside the image (build context `kb-index`)
FROM build AS kb-prebuilt
COPY --from=kb-index snapshot.npz /app/rag-db/snapshot.npz
COPY --from=kb-index model/ /app/rag-db/model/

# kb: either of them, checked with the runtime virtualenv alone
FROM kb-${KB_INDEX} AS kb
ENV LIBVIRT_OPERATOR_RAG_DIR=/app/rag \
    LIBVIRT_OPERATOR_RAG_DB=/app/rag-db
RUN /opt/runtime/bin/libvirt-operator explain "Connection refused" --json \
    | /opt/runtime/bin/python -c "import json, sys; assert json.load(sys.stdin)['remediation'][0]['score'] > 0" \
 && /opt/runtime/bin/libvirt-operator rag search "host unreachable" --code HOST_UNREACHABLE --limit 1 >/dev/null

# ------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="libvirt-operator" \
      org.opencontainers.image.description="Kubernetes operator (kopf) that manages virtual machines on external libvirt hosts" \
      org.opencontainers.image.licenses="Apache-2.0"

# libvirt0: the client library libvirt-python links; libvirt-clients: virsh for debugging;
# openssh-client: the qemu+ssh:// transport runs ssh.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 libvirt-clients openssh-client ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log

# Debian's base-passwd already has a group `operator` (gid 37): the image's user and group are
# `libvirt-operator`, UID/GID 10001 (the chart's runAsUser/runAsGroup).
ARG UID=10001
RUN groupadd --gid ${UID} libvirt-operator \
 && useradd --uid ${UID} --gid ${UID} --home-dir /home/operator --create-home --shell /usr/sbin/nologin libvirt-operator \
 && mkdir -p /var/cache/libvirt-operator/iso \
 && chown -R ${UID}:${UID} /var/cache/libvirt-operator

COPY --from=kb /opt/runtime /opt/runtime
COPY --from=kb /app /app

ENV PATH=/opt/runtime/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/operator \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    LIBVIRT_OPERATOR_RAG_DIR=/app/rag \
    LIBVIRT_OPERATOR_RAG_DB=/app/rag-db \
    LIBVIRT_OPERATOR_ISO_CACHE_DIR=/var/cache/libvirt-operator/iso

WORKDIR /app
USER ${UID}:${UID}
# Everything written at run time: with `docker run --read-only` these stay writable (the Helm chart
# mounts emptyDirs on the same paths, with readOnlyRootFilesystem: true).
VOLUME ["/tmp", "/home/operator", "/var/cache/libvirt-operator"]
EXPOSE 8080 8081
ENTRYPOINT ["libvirt-operator", "run", "--log-format", "json"]
