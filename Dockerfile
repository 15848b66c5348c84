# syntax=docker/dockerfile:1
# celery-operator image. Build from the repository root:
#   docker build -t ghcr.io/celery-operator/celery-operator:0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" .

ARG RUST_VERSION=1

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
# The registry, git and target caches survive between builds; the binary is copied out of the target
# cache mount because a cache mount is not part of the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p celery-operator \
 && install -D -m 0755 target/release/celery-operator /out/celery-operator

# glibc, libgcc and CA certificates, no shell or package manager. TLS is rustls with ring: no OpenSSL.
FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="celery-operator" \
      org.opencontainers.image.description="Kubernetes operator and autoscaler for Celery worker fleets" \
      org.opencontainers.image.url="https://github.com/celery-operator/celery-operator" \
      org.opencontainers.image.source="https://github.com/celery-operator/celery-operator" \
      org.opencontainers.image.documentation="https://github.com/celery-operator/celery-operator#readme" \
      org.opencontainers.image.vendor="celery-operator" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

COPY --from=builder /out/celery-operator /celery-operator
# distroless's "nonroot" user, by number so the kubelet can enforce runAsNonRoot without runAsUser.
USER 65532:65532
# /metrics, /healthz, /readyz
EXPOSE 8080
ENTRYPOINT ["/celery-operator"]
CMD ["run"]
