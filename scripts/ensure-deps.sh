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
}
