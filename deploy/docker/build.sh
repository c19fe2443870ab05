#!/usr/bin/env bash
# Builds the CPU image `shardserve:latest` (and `shardserve-etcd:latest`, etcd for the Compose
# cluster) with the local Docker Engine, on a machine that may reach no container registry:
#  - the base, debian:bookworm-slim, is made from Debian's packages (debootstrap + docker import)
#    when the engine does not have it;
#  - the binaries are built on the host (this machine must run Debian bookworm or an older glibc)
#    and copied into the image by the Dockerfile's builder stage (PREBUILT=1), unless BUILDER=1,
#    which compiles them in that stage on rust:bookworm (that image must be pullable).
#
#   PROFILE   cargo profile of the host build: release (default) or dev (the tests reuse the
#             binaries they already built)
#   BIN_DIR   take coordinator, worker and shardctl from this folder instead of building them
#   IMAGE     the tag (default shardserve:latest)
set -euo pipefail
cd "$(dirname "$0")/../.."
IMAGE=${IMAGE:-shardserve:latest}
PROFILE=${PROFILE:-release}
BASE=debian:bookworm-slim
command -v docker >/dev/null || { echo "docker not found" >&2; exit 1; }
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    if ! command -v debootstrap >/dev/null; then
        echo "installing debootstrap" >&2
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq debootstrap >/dev/null
    fi
    root=$(mktemp -d)
    trap '$sudo rm -rf "$root"' EXIT
    echo "making $BASE with debootstrap (about a minute)" >&2
    $sudo debootstrap --variant=minbase --include=ca-certificates,tini bookworm "$root" \
        "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
    $sudo rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
    $sudo tar -C "$root" -c . | docker import --change 'CMD ["bash"]' - "$BASE" >/dev/null
fi

if [ -n "${BUILDER:-}" ]; then
    docker build -f deploy/docker/Dockerfile -t "$IMAGE" .
else
    dir=${BIN_DIR:-}
    if [ -z "$dir" ]; then
        bash scripts/setup.sh >&2
        if [ "$PROFILE" = dev ]; then dir=target/debug; else dir=target/$PROFILE; fi
        cargo build --profile "$PROFILE" -p shardserve-coordinator -p shardserve-worker --bins >&2
    fi
    rm -rf target/docker-bin
    mkdir -p target/docker-bin
    cp "$dir/coordinator" "$dir/worker" "$dir/shardctl" target/docker-bin/
    docker build -q -f deploy/docker/Dockerfile --build-arg PREBUILT=1 --build-arg BUILDER_IMAGE=$BASE -t "$IMAGE" . >/dev/null
fi
echo "built $IMAGE" >&2

# etcd for Compose (docker compose uses quay.io/coreos/etcd unless ETCD_IMAGE says otherwise).
if [ -z "${NO_ETCD:-}" ]; then
    bash scripts/setup.sh --etcd >&2
    ctx=$(mktemp -d)
    cp "$(command -v etcd || echo /usr/bin/etcd)" "$ctx/etcd"
    docker build -q -f deploy/docker/Dockerfile.etcd -t shardserve-etcd:latest "$ctx" >/dev/null
    rm -rf "$ctx"
    echo "built shardserve-etcd:latest" >&2
fi
