# syntax=docker/dockerfile:1.7
# One multi-stage build for every binary of the platform:
#   docker build --build-arg PACKAGE=cqrs-gateway  --build-arg BIN=gateway  -t cqrs/gateway:dev .
#   docker build --build-arg PACKAGE=cqrs-mutation --build-arg BIN=mutation -t cqrs/mutation:dev .
#   docker build --build-arg PACKAGE=cqrs-query    --build-arg BIN=query    -t cqrs/query:dev .
#   docker build --build-arg PACKAGE=cqrs-operator --build-arg BIN=operator -t cqrs/operator:dev .
# e2e/kind/e2e.sh builds all four this way.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

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

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# CA certificates for TLS to managed databases; zlib for librdkafka. Nothing else: no shell tools are needed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 app \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin app
COPY --from=build /out/app /usr/local/bin/app
# Numeric user so Kubernetes' runAsNonRoot can verify it; matches runAsUser in the operator-built pods.
USER 65532:65532
ENV LOG_FORMAT=json
ENTRYPOINT ["/usr/local/bin/app"]
