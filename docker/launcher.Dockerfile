# The launcher CLI image: `launcher submit|status|logs|...` from inside a cluster
# (CI runners, GitOps hooks) and the chart's `helm test` S3 check (the bucket hook runs mc in the MinIO image).
# No torch: the launcher's dependencies only. Build with hack/build-images.sh.
#   BASE_IMAGE  production: debian:bookworm-slim; CI: lora-jobs/debian:bookworm
#               (hack/base-image.sh, no registry needed).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,target=/var/lib/apt/lists,sharing=locked \
    rm -f /etc/apt/apt.conf.d/docker-clean \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates \
 && python3 -m venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies before code, so editing launcher/ or jobs/ reuses this layer; the
# wheel cache works as in trainer.Dockerfile. requirements-launcher.txt is the subset
# of requirements/lock.txt for pyproject.toml's base, its extra data and the build
# backend (setuptools, for the --no-build-isolation install below), by hack/lock.sh.
COPY docker/requirements-launcher.txt /tmp/requirements.txt
RUN --mount=type=cache,id=lora-jobs-wheels,target=/var/cache/wheels,sharing=locked \
    --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && pip download --no-deps --dest /var/cache/wheels -r /tmp/requirements.txt \
 && pip install --no-deps --no-index --no-cache-dir --find-links /var/cache/wheels -r /tmp/requirements.txt \
 && pip check \
 && rm /tmp/requirements.txt

# The package itself: the launcher and the light contract it imports (jobs/*.py, jobs/dataprep/ and jobs/spec/:
# the spec model, errors, storage, the artifact layout, the data rules), never the trainer (jobs/trainer/, torch).
# README.m[d] matches nothing rather than failing while the repository has no README.
WORKDIR /src
COPY pyproject.toml README.m[d] ./
COPY jobs/*.py jobs/py.typed ./jobs/
COPY jobs/dataprep/*.py ./jobs/dataprep/
COPY jobs/spec/*.py ./jobs/spec/
COPY launcher/ ./launcher/
RUN test -f README.md || echo "# lora-jobs" > README.md \
 && pip install --no-deps --no-build-isolation --no-cache-dir . \
 && cd / && rm -rf /src

# uid/gid 10001, as the chart's pods run: above 10000, so no user of the node.
RUN groupadd --gid 10001 launcher \
 && useradd --uid 10001 --gid 10001 --home-dir /home/launcher --create-home --shell /usr/sbin/nologin launcher
ENV PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/launcher
ENTRYPOINT ["launcher"]
CMD ["--help"]

# Last, because build arguments are part of every later step's cache key: a new
# revision or date must not invalidate the dependency layers.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="lora-jobs launcher" \
      org.opencontainers.image.description="Submits and follows lora-jobs training Jobs on Kubernetes" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0"
