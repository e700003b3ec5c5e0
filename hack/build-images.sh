#!/usr/bin/env bash
# Builds the trainer and launcher images: lora-jobs/{trainer,launcher}:<version>.
#
#   hack/build-images.sh              both images
#   hack/build-images.sh launcher     one of them
#   hack/build-images.sh minio        the chart's dev MinIO (with mc, for its bucket hook):
#                                     lora-jobs/minio:<MINIO_VERSION>, from the MinIO and mc
#                                     that hack/build-stack.sh builds (built here when missing)
#
# Environment:
#   BASE_IMAGE          base of both images (default: the local Debian image from
#                       hack/base-image.sh, built here first when missing)
#   TRAINER_BASE_IMAGE  base of the trainer only, e.g. nvidia/cuda:13.0.2-base-ubuntu24.04
#   CA_BUNDLE           CA file given to pip as a build secret (default: the host's
#                       bundle, which trusts TLS-intercepting proxies; "none" to skip)
#   IMAGE_PREFIX        repository prefix of the tags (default: lora-jobs)
#   DOCKER              docker client with BuildKit (default: /usr/bin/docker when present)
#
# Dependencies sit in their own layers and pip's wheel cache is a BuildKit cache
# mount: a code change rebuilds in seconds, a lock change downloads only what changed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"

# The 20.10 client speaks BuildKit (DOCKER_BUILDKIT=1) to dockerd itself; a newer
# client without the buildx plugin refuses --secret and RUN --mount.
if [ -z "${DOCKER:-}" ]; then
  if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
export DOCKER_BUILDKIT=1
command -v "$DOCKER" >/dev/null || fail "no docker client ($DOCKER)" /dev/null "apt-get install -y docker.io, or set DOCKER"
"$DOCKER" info >/dev/null 2>&1 || fail "the Docker engine is not reachable" /dev/null "start dockerd (hack/stack.sh starts it) or check DOCKER_HOST"

version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$REPO_ROOT/pyproject.toml" | head -n1)
# The revision and created labels name the newest commit that changed what goes INTO the image (its
# Dockerfile, requirements and the files it copies), at that commit's time, not HEAD's or the build's:
# a commit that changes only tests or docs then builds the same image ID, which `hack/node.sh push`
# finds in the registry already. A new label made each build a new image, and each push a full ~6 GB
# export to the registry (85 s here). Uncommitted changes to those files add "-dirty" to the revision.
labels_for() {  # PATH... -> "revision created"
  local rev created
  rev=$(git -C "$REPO_ROOT" log -1 --format=%h -- "$@" 2>/dev/null) || rev=""
  [ -n "$rev" ] || { echo "unknown $(date -u +%Y-%m-%dT%H:%M:%SZ)"; return; }
  created=$(TZ=UTC0 git -C "$REPO_ROOT" log -1 --date=format-local:%Y-%m-%dT%H:%M:%SZ --format=%cd "$rev")
  [ -z "$(git -C "$REPO_ROOT" status --porcelain -- "$@" 2>/dev/null)" ] || rev="$rev-dirty"
  echo "$rev $created"
}
prefix=${IMAGE_PREFIX:-lora-jobs}
default_base=lora-jobs/debian:$DEBIAN_SUITE
base=${BASE_IMAGE:-$default_base}
trainer_base=${TRAINER_BASE_IMAGE:-$base}

ca_args=()
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
if [ "$ca" != none ] && [ -f "$ca" ]; then ca_args=(--secret "id=ca_bundle,src=$ca"); fi

images=("$@")
[ ${#images[@]} -gt 0 ] || images=(launcher trainer)

for image in "${images[@]}"; do
  context=$REPO_ROOT tag="$prefix/$image:$version" extra=()
  case "$image" in
    trainer) from=$trainer_base inputs=(docker/trainer.Dockerfile docker/requirements-trainer.txt pyproject.toml jobs) ;;
    launcher) from=$base inputs=(docker/launcher.Dockerfile docker/requirements-launcher.txt pyproject.toml README.md jobs launcher) ;;
    minio)
      inputs=(docker/minio.Dockerfile hack/versions.env)
      # The build context is just the two binaries: nothing of the repository goes in.
      from=$base tag="$prefix/minio:$MINIO_VERSION"
      bins=("$(piece_bin minio "$MINIO_VERSION" minio)" "$(piece_bin mc "$MC_VERSION" mc)")
      [ -x "${bins[0]}" ] && [ -x "${bins[1]}" ] || "$here/build-stack.sh" minio mc
      context=$(mktemp -d)
      trap 'rm -rf "$context"' EXIT
      for b in "${bins[@]}"; do
        ln "$b" "$context/" 2>/dev/null || cp "$b" "$context/"
      done
      extra=(--build-arg "MINIO_VERSION=$MINIO_VERSION" --build-arg "MC_VERSION=$MC_VERSION") ;;
    *) fail "unknown image '$image'" /dev/null "name trainer, launcher and/or minio" ;;
  esac
  if [ "$from" = "$default_base" ] && ! "$DOCKER" image inspect "$from" >/dev/null 2>&1; then
    DOCKER="$DOCKER" "$here/base-image.sh"
  fi
  read -r revision created < <(labels_for "${inputs[@]}")
  log="$STACK_LOGS/build-$image.log"
  [ "$image" = minio ] && log="$STACK_LOGS/build-minio-image.log"  # build-minio.log is the binary's (build-stack.sh)
  say "building $tag from $from (log: $log)"
  start=$(date +%s)
  previous=$("$DOCKER" image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
  "$DOCKER" build --progress=plain \
      -f "$REPO_ROOT/docker/$image.Dockerfile" \
      --build-arg "BASE_IMAGE=$from" \
      --build-arg "VERSION=$version" \
      --build-arg "REVISION=$revision" \
      --build-arg "CREATED=$created" \
      "${extra[@]}" "${ca_args[@]}" \
      -t "$tag" "$context" >"$log" 2>&1 \
    || fail "docker build of $tag failed" "$log" "read the log; a pip or apt download error usually means the CA bundle (CA_BUNDLE) or the network"
  if [ "$context" != "$REPO_ROOT" ]; then rm -rf "$context"; trap - EXIT; fi
  size=$("$DOCKER" image inspect -f '{{.Size}}' "$tag")
  # the image this tag named before, left untagged by the rebuild: gigabytes a trainer rebuild (kept when a
  # container or another tag still uses it)
  if [ -n "$previous" ] && [ "$previous" != "$("$DOCKER" image inspect -f '{{.Id}}' "$tag")" ]; then
    "$DOCKER" image rm "$previous" >/dev/null 2>&1 || true
  fi
  say "built $tag in $(( $(date +%s) - start ))s, $(( size / 1024 / 1024 )) MiB"
done
