# Sourced by the README commands: installs what building and testing Understudy needs on a
# fresh Debian machine of ours (cargo is expected from rustup; the rest comes from apt-get).
ensure_deps() {
    if ! command -v cargo >/dev/null 2>&1; then
        if [ -x "$HOME/.cargo/bin/cargo" ]; then
            export PATH="$HOME/.cargo/bin:$PATH"
        else
            echo "cargo not found: install Rust with rustup (https://rustup.rs) and retry" >&2
            return 1
        fi
    fi
    local missing=()
    command -v gcc >/dev/null 2>&1 || missing+=(gcc)
    command -v objcopy >/dev/null 2>&1 || missing+=(binutils)
    command -v ip >/dev/null 2>&1 || missing+=(iproute2)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${missing[*]} with apt-get"
        apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
        echo "warning: /dev/kvm is missing or not read-write for $(id -un); guests cannot run" >&2
    fi
    ensure_netns_tools
}

# `ip` (iproute2: network namespaces, veth, bridge) and `nft` (nftables), for the partition
# tests (tests/partition.rs), which cut links between namespaces. Installs what is missing.
ensure_netns_tools() {
    local missing=()
    command -v ip >/dev/null 2>&1 || missing+=(iproute2)
    command -v nft >/dev/null 2>&1 || missing+=(nftables)
    [ ${#missing[@]} -eq 0 ] && return 0
    if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" -ne 0 ]; then
        echo "warning: ${missing[*]} missing (the partition tests need them); install as root with apt-get" >&2
        return 0
    fi
    echo "installing ${missing[*]} with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Debian's `prometheus` package (it provides `prometheus` and `promtool`), for the
# observability tests (tests/observability.rs, scripts/prometheus.sh). Installs itself.
ensure_prometheus() {
    if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "prometheus/promtool are missing and apt-get is not available to install them" >&2
        return 1
    fi
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; else
            echo "prometheus/promtool are missing and installing them needs root (or sudo)" >&2
            return 1
        fi
    fi
    echo "installing prometheus (provides prometheus and promtool) with apt-get"
    # The package's service must not start on a machine without systemd (or at all here).
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold prometheus >/dev/null ||
        { echo "apt-get install prometheus failed" >&2; return 1; }
    command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || {
        echo "the prometheus package installed but prometheus/promtool are not on PATH" >&2
        return 1
    }
}
