# The chart's development MinIO (minio.enabled) and its bucket hook, from the MinIO and mc
# binaries that hack/build-stack.sh builds from their Go modules (the same MinIO the local
# stack runs): nothing is pulled from a registry. The hook runs `/bin/sh setup.sh`, which
# needs sh, cat and mc; the Deployment passes `server /data ...` as arguments, so the entry
# point is minio itself. Built by `hack/build-images.sh minio` with the two binaries as
# the whole build context.
#   BASE_IMAGE  CI: lora-jobs/debian:bookworm (hack/base-image.sh); elsewhere debian:bookworm-slim.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

COPY minio mc /usr/local/bin/
# uid/gid 10001, as every pod of the chart runs; no home: the chart sets HOME and MC_CONFIG_DIR under /tmp.
RUN groupadd --gid 10001 minio \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin minio \
 && minio --version >/dev/null && mc --version >/dev/null
ENV HOME=/tmp MINIO_BROWSER=off
USER 10001:10001
EXPOSE 9000
ENTRYPOINT ["minio"]
CMD ["--help"]

ARG MINIO_VERSION=unknown
ARG MC_VERSION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="lora-jobs dev MinIO" \
      org.opencontainers.image.description="MinIO and mc built from their Go modules, for the chart's minio.enabled (development only)" \
      org.opencontainers.image.version="${MINIO_VERSION}" \
      org.opencontainers.image.created="${CREATED}" \
      dev.lora-jobs.mc-version="${MC_VERSION}" \
      org.opencontainers.image.licenses="AGPL-3.0-only"
