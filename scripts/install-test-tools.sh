#!/usr/bin/env bash
# Install the real tools the operator tests use, where they are missing:
#   - Debian's `prometheus` package: the `prometheus` server and `promtool`
#     (tests/deploy: promtool check metrics|rules, promtool test rules, a live scrape);
#   - a Compose implementation for `docker compose config` / `docker-compose config`
#     (only when a docker CLI exists and has no compose plugin);
#   - `g++`, which builds the CUDA kernels for the CPU emulation (tests/cudasim).
#
# Idempotent: does nothing when the tools are already on PATH. Never fails the caller: when apt is
# unavailable (not root, no network, not Debian), it prints why and exits 0, and the tests that need a
# tool skip with a reason naming it. In CI and on the dev machines apt works, so the tests really run.
#
# Usage: scripts/install-test-tools.sh            (as root, or with passwordless sudo)
set -u

log() { printf 'install-test-tools: %s\n' "$*" >&2; }

have() { command -v "$1" >/dev/null 2>&1; }

compose_available() {
    if have docker && docker compose version >/dev/null 2>&1; then return 0; fi
    have docker-compose
}

need=()
if ! have promtool || ! have prometheus; then
    need+=(prometheus)
fi
if have docker && ! compose_available; then
    need+=(docker-compose)
fi
if ! have g++; then
    need+=(g++)
fi

if [ ${#need[@]} -eq 0 ]; then
    log "nothing to install (promtool, prometheus, g++$(have docker && echo ', compose') present)"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if have sudo && sudo -n true >/dev/null 2>&1; then
        SUDO=(sudo -n)
    else
        log "not root and no passwordless sudo; cannot install: ${need[*]} (dependent tests will skip)"
        exit 0
    fi
fi

if ! have apt-get; then
    log "apt-get not found; cannot install: ${need[*]} (dependent tests will skip)"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
log "apt-get update"
if ! "${SUDO[@]}" apt-get update -qq; then
    log "apt-get update failed; cannot install: ${need[*]} (dependent tests will skip)"
    exit 0
fi
# --no-install-recommends: the prometheus package recommends node-exporter and friends; we need only the binaries.
# Installing the package does not start a server here (no systemd in containers/CI), and the tests start
# their own on loopback with a temporary config and storage.
for pkg in "${need[@]}"; do
    log "apt-get install $pkg"
    if ! "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null; then
        log "apt-get install $pkg failed (dependent tests will skip)"
    fi
done

have promtool && log "promtool: $(promtool --version 2>&1 | head -n1)"
have prometheus && log "prometheus: $(prometheus --version 2>&1 | head -n1)"
have docker-compose && log "docker-compose: $(docker-compose version --short 2>&1 | head -n1)"
exit 0
