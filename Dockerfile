# syntax=docker/dockerfile:1.7
# One multi-stage build for every binary of the platform:
#   docker build --build-arg PACKAGE=cqrs-gateway  --build-arg BIN=gateway  -t cqrs/gateway:dev .
#   docker build --build-arg PACKAGE=cqrs-mutation --build-arg BIN=mutation -t cqrs/mutation:dev .
#   docker build --build-arg PACKAGE=cqrs-query    --build-arg BIN=query    -t cqrs/query:dev .
#   docker build --build-arg PACKAGE=cqrs-operator --build-arg BIN=operator -t cqrs/operator:dev .
# e2e/kind/e2e.sh builds all four this way.
#
# Binaries built on the host instead (no Rust toolchain in the image; what e2e/cluster/images.sh does with
# buildah, since no registry image can be pulled on a machine without one): the `prebuilt` target, with a build
# context that holds the binary under the name BIN, and a locally made Debian base:
#   buildah bud --target prebuilt --build-arg BIN=gateway --build-arg RUNTIME_BASE=localhost/cqrs-base:bookworm \
#     -f Dockerfile -t cqrs/gateway:dev <folder holding ./gateway>

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm
ARG RUNTIME_BASE=debian:${DEBIAN_RELEASE}-slim

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# rdkafka builds its bundled librdkafka: a C toolchain, make, zlib and pkg-config (all but cmake are in the image).
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake pkg-config zlib1g-dev libcurl4-openssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ARG PACKAGE
ARG BIN
RUN test -n "$PACKAGE" && test -n "$BIN"
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p "$PACKAGE" --bin "$BIN" \
 && install -D -m 0755 "target/release/$BIN" /out/app

FROM ${RUNTIME_BASE} AS base
# CA certificates for TLS to managed databases; zlib for librdkafka. Nothing else: no shell tools are needed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 app \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin app
# Numeric user so Kubernetes' runAsNonRoot can verify it; matches runAsUser in the operator-built pods.
USER 65532:65532
ENV LOG_FORMAT=json
ENTRYPOINT ["/usr/local/bin/app"]

# A binary built on the host: the build context holds it under the name BIN (see the top of this file).
FROM base AS prebuilt
ARG BIN
COPY ${BIN} /usr/local/bin/app

# The default target: the binary built in the `build` stage.
FROM base AS runtime
COPY --from=build /out/app /usr/local/bin/app
