#!/usr/bin/env bash
# Builds the gateway, mutation, query and operator images from the project's Dockerfile with Debian's buildah
# (no Docker engine, no registry) and imports them into the local cluster's containerd. The binaries are built
# on the host (`cargo build`, the dev profile unless CLUSTER_PROFILE=release: the test suite has built them
# already) and copied in through the Dockerfile's `prebuilt` target. The runtime base is Debian bookworm made with
# debootstrap (--variant=minbase) from Debian's packages, since no registry image can be pulled.
# Usage: images.sh [TAG]   (default: a hash of the four binaries). Prints the tag.
# shellcheck source=e2e/cluster/lib.sh
. "$(dirname "$0")/lib.sh"
[[ $(id -u) -eq 0 ]] || die "building images here needs root (buildah's chroot isolation)"
command -v buildah >/dev/null && command -v debootstrap >/dev/null || {
  log "installing buildah and debootstrap (Debian)"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah debootstrap >&2
}
profile="${CLUSTER_PROFILE:-dev}"
target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
out_dir="$target_dir/$([[ $profile == dev ]] && echo debug || echo "$profile")"
BINS=(gateway mutation query operator)
STORE=(--root "$CQRS_CACHE/buildah/storage" --runroot "$CQRS_CACHE/buildah/run" --storage-driver vfs)
mkdir -p "$IMAGE_DIR"

log "building the binaries (cargo, profile $profile)"
(cd "$ROOT" && cargo build --profile "$profile" -p cqrs-gateway -p cqrs-mutation -p cqrs-query -p cqrs-operator \
  --bin gateway --bin mutation --bin query --bin operator) >&2

# The runtime base, once per Debian release (minbase plus passwd, as in debian:bookworm-slim; ~145 MB).
base_ref=localhost/cqrs-base:bookworm
if ! buildah "${STORE[@]}" inspect --type image "$base_ref" >/dev/null 2>&1; then
  base_tar="$IMAGE_DIR/cqrs-base-bookworm.tar"
  if [[ ! -f "$base_tar" ]]; then
    log "making the Debian bookworm base with debootstrap"
    rootfs="$(mktemp -d)"
    debootstrap --variant=minbase --include=passwd bookworm "$rootfs" http://deb.debian.org/debian >&2
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
    mkimage "$base_ref" "$rootfs" "$base_tar" '["/bin/bash"]'
    rm -rf "$rootfs"
  fi
  buildah "${STORE[@]}" pull -q "docker-archive:$base_tar" >/dev/null
  buildah "${STORE[@]}" tag "$(buildah "${STORE[@]}" images -q --filter reference="$base_ref" | head -1 || true)" "$base_ref" 2>/dev/null || true
fi

# The build context: just the four binaries, without their debug info.
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
for b in "${BINS[@]}"; do objcopy --strip-debug "$out_dir/$b" "$ctx/$b"; done
tag="${1:-b-$(cat "${BINS[@]/#/$ctx/}" | sha256sum | cut -c1-12)}"

for b in "${BINS[@]}"; do
  tarball="$IMAGE_DIR/$b-$tag.tar"
  if [[ ! -f "$tarball" ]]; then
    log "building image cqrs/$b:$tag"
    buildah "${STORE[@]}" bud --isolation chroot --layers --quiet --target prebuilt \
      --build-arg "BIN=$b" --build-arg "PACKAGE=cqrs-$b" --build-arg "RUNTIME_BASE=$base_ref" \
      -f "$ROOT/Dockerfile" -t "cqrs/$b:$tag" "$ctx" >/dev/null
    buildah "${STORE[@]}" push -q "cqrs/$b:$tag" "docker-archive:$tarball.tmp:cqrs/$b:$tag" >/dev/null
    mv "$tarball.tmp" "$tarball"
  fi
  if [[ -S "$SOCK" ]]; then
    ctr_ images import "$tarball" >/dev/null
    log "imported cqrs/$b:$tag into the node"
  fi
done
echo "$tag"
