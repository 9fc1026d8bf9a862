# Sourced by scripts/prepare-docker and scripts/prepare-podman: running as root (or with password-less sudo) and
# installing Debian packages with the machine's own apt. `say` needs $me, the script's name.
say() { echo "$me: $*" >&2; }
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo -n "$@"
    else say "need root (or password-less sudo) for: $*"; return 1
    fi
}
apt_install() {
    say "installing Debian packages: $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2 \
        || { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 \
             && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2; }
}
