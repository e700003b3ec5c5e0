# The training job image: python -m jobs run --spec /etc/lora-jobs/spec.yaml
#
# BASE_IMAGE is the only thing that differs between production and CI:
#   production  a CUDA image (the default below). The PyPI torch wheel carries
#               its own CUDA runtime libraries (the nvidia-* wheels), so the
#               small "-base" flavour is enough: it sets NVIDIA_VISIBLE_DEVICES
#               and NVIDIA_DRIVER_CAPABILITIES for the NVIDIA container toolkit;
#               a "-runtime" base would only duplicate ~2 GB of CUDA libraries.
#   CI / kind   lora-jobs/debian:bookworm, made locally by hack/base-image.sh
#               (no registry is reachable there); torch then runs on the CPU.
# Build with hack/build-images.sh (BuildKit is required for the cache and secret
# mounts). A CA bundle for TLS-intercepting networks is an optional build
# secret: --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt
ARG BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
FROM ${BASE_IMAGE}

# Debian's (bookworm: 3.11) or Ubuntu's (noble: 3.12) Python; the apt caches are
# cache mounts, so they never land in a layer and a rebuild does not refetch.
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

# The ML stack, in its own layer before any of our code: a change to jobs/ never
# reinstalls it. The wheels themselves are kept in a BuildKit cache mount (kept by
# the builder, never in the image; shared with the launcher build): `pip download`
# skips a wheel already there, so a rebuild after a lock change downloads only what
# changed. (pip's own HTTP cache is not enough: it stores nothing when a proxy
# strips the caching headers, as the TLS-intercepting one here does.)
# requirements-trainer.txt is the subset of requirements/lock.txt for pyproject.toml's
# extras train, qlora and fp8, written by hack/lock.sh: complete, hence --no-deps;
# `pip check` proves it consistent.
COPY docker/requirements-trainer.txt /tmp/requirements.txt
RUN --mount=type=cache,id=lora-jobs-wheels,target=/var/cache/wheels,sharing=locked \
    --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && pip download --no-deps --dest /var/cache/wheels -r /tmp/requirements.txt \
 && pip install --no-deps --no-index --no-cache-dir --find-links /var/cache/wheels -r /tmp/requirements.txt \
 && pip check \
 && rm /tmp/requirements.txt

# Our code: small, last, and not pip-installed (pyproject.toml would also declare
# the launcher's console script, which this image does not carry). The job only
# needs `python -m jobs` to import it; pyproject.toml travels along as the
# record of the version and dependency ranges.
WORKDIR /opt/lora-jobs
COPY pyproject.toml ./
COPY jobs/ ./jobs/
RUN python -m compileall -q jobs

# uid/gid 10001, matching the Job's runAsUser: above 10000, so it is no user of
# the node (uid 1000 is usually the first login user of a host). No
# home directory contents, no secrets: credentials come from the Job at run time.
RUN groupadd --gid 10001 trainer \
 && useradd --uid 10001 --gid 10001 --home-dir /scratch --no-create-home --shell /usr/sbin/nologin trainer \
 && install -d -o 10001 -g 10001 -m 0775 /scratch
# The root filesystem is read-only in the Job: everything written goes to /scratch
# (an emptyDir or ephemeral volume mounted by the Job) or /tmp.
ENV PYTHONPATH=/opt/lora-jobs \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/scratch \
    LORA_JOBS_WORKDIR=/scratch \
    HF_HOME=/scratch/hf \
    MPLCONFIGDIR=/tmp/matplotlib \
    MPLBACKEND=Agg
USER 10001:10001
WORKDIR /scratch
ENTRYPOINT ["python", "-m", "jobs"]
CMD ["--help"]

# Last, because build arguments are part of every later step's cache key: a new
# revision or date must not invalidate the dependency layers.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="lora-jobs trainer" \
      org.opencontainers.image.description="Fine-tunes an LLM with LoRA/QLoRA from a lora-jobs spec and publishes versioned artifacts to S3" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0"
