# One control-plane component of the kind node image made here (hack/kind-node-image.sh):
# a binary from our pinned build on the Debian base, plus the Debian packages it calls
# (kube-proxy: iptables, conntrack). The context is just bin/<binary>.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ARG PACKAGES=""
RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,target=/var/lib/apt/lists,sharing=locked \
    if [ -n "$PACKAGES" ]; then \
      rm -f /etc/apt/apt.conf.d/docker-clean && apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $PACKAGES; \
    fi
COPY bin/ /usr/local/bin/
ARG BINARY
# Static pods and kube-proxy's DaemonSet name their command; CoreDNS's Deployment only passes args.
RUN ln -s "/usr/local/bin/$BINARY" /entrypoint && "/usr/local/bin/$BINARY" --version >/dev/null 2>&1 || "/usr/local/bin/$BINARY" -version
ENTRYPOINT ["/entrypoint"]
