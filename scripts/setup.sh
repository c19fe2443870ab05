#!/usr/bin/env bash
# Installs, when missing, what shardserve needs beyond a Rust toolchain on Debian/Ubuntu:
# protoc (etcd-client compiles etcd's .proto files at build time) and, with --etcd, Debian's
# etcd-server (the integration tests start real etcd servers).
set -euo pipefail
need=()
command -v protoc >/dev/null || need+=(protobuf-compiler)
if [ "${1:-}" = "--etcd" ] && ! command -v etcd >/dev/null && [ ! -x /usr/bin/etcd ]; then
    need+=(etcd-server)
fi
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi
    echo "installing ${need[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
