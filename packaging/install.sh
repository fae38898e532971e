#!/usr/bin/env bash
# edge-agent offline installer: run from an unpacked bundle (make bundle), as root.
# Installs with no network: pip reads only the bundle's wheels/ (--no-index).
# docs/DEPLOY.md, "Bare hardware: the offline bundle".
set -Eeuo pipefail  # -E: the ERR trap below also fires inside functions

usage() {
    cat <<'EOF'
Usage: ./install.sh [--no-start] [--prefix DIR] [--destdir DIR] [--python PYTHON]

Installs edge-agent from this bundle, with no network access:
  PREFIX (/opt/edge-agent)        a virtual environment made with the node's python3,
                                  holding the agent and every dependency (wheels/ only)
  /etc/systemd/system             edge-agent.service
  /usr/lib/sysusers.d             edge-agent.conf (the edge-agent system user), applied
  /usr/lib/tmpfiles.d             edge-agent.conf (/etc/edge-agent, /var/lib/edge-agent,
                                  /var/cache/edge-agent), applied
  /etc/edge-agent/config.toml     the commented sample, only when no config.toml exists
then `systemctl daemon-reload` and `systemctl enable --now edge-agent` (a running agent
is restarted instead: that is an upgrade). Running it again is safe: an upgrade keeps
/etc/edge-agent/config.toml and the state in /var/lib/edge-agent, which the new agent
migrates at its first start.

Options:
  --no-start       install and daemon-reload, but neither enable nor (re)start the unit
  --prefix DIR     where the virtual environment goes (default /opt/edge-agent; the
                   unit's ExecStart follows it)            [env PREFIX]
  --destdir DIR    stage everything under DIR (DIR/opt/edge-agent, DIR/etc/...), touch
                   nothing on the live system (no user, no systemctl); needs no root.
                   The staged venv runs in place.          [env DESTDIR]
  --python PYTHON  the interpreter for the venv (default python3; it must match the
                   bundle's Python tag)                    [env PYTHON]
  -h, --help       this text

Exit codes: 0 installed; 64 bad usage; 65 the bundle is damaged or incomplete;
69 this node cannot take this bundle (Python version, architecture, no venv module);
73 PREFIX holds something that is not an edge-agent install; 77 not root;
1 a step failed (the message names it).
EOF
}

say() { printf 'install.sh: %s\n' "$*"; }
die() {
    local code=$1
    shift
    printf 'install.sh: error: %s\n' "$*" >&2
    exit "$code"
}
on_error() {
    local rc=$?
    printf 'install.sh: error: step failed (exit %s) at line %s: %s\n' "$rc" "$1" "$BASH_COMMAND" >&2
}
trap 'on_error $LINENO' ERR

PREFIX=${PREFIX:-/opt/edge-agent}
DESTDIR=${DESTDIR:-}
PYTHON=${PYTHON:-python3}
START=1
while [ $# -gt 0 ]; do
    case $1 in
    --no-start) START=0 ;;
    --prefix) [ $# -ge 2 ] || die 64 "--prefix needs a directory"; PREFIX=$2; shift ;;
    --prefix=*) PREFIX=${1#*=} ;;
    --destdir) [ $# -ge 2 ] || die 64 "--destdir needs a directory"; DESTDIR=$2; shift ;;
    --destdir=*) DESTDIR=${1#*=} ;;
    --python) [ $# -ge 2 ] || die 64 "--python needs an interpreter"; PYTHON=$2; shift ;;
    --python=*) PYTHON=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    *) printf 'install.sh: error: unknown argument %s\n\n' "$1" >&2; usage >&2; exit 64 ;;
    esac
    shift
done
case $PREFIX in
/?*) PREFIX=${PREFIX%/} ;;
*) die 64 "--prefix must be an absolute path other than /, got '$PREFIX'" ;;
esac
if [ -n "$DESTDIR" ]; then
    mkdir -p "$DESTDIR"
    DESTDIR=$(cd "$DESTDIR" && pwd)
fi

UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
CONFIG_DIR=${CONFIG_DIR:-/etc/edge-agent}
SYSUSERS_DIR=${SYSUSERS_DIR:-/usr/lib/sysusers.d}
TMPFILES_DIR=${TMPFILES_DIR:-/usr/lib/tmpfiles.d}
LIVE=1 # acting on the running system (users, systemctl): not when staging into DESTDIR
[ -z "$DESTDIR" ] || LIVE=0

BUNDLE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# --- The bundle: complete, and for this node ---------------------------------------------
if [ ! -f "$BUNDLE/bundle.env" ] || [ ! -d "$BUNDLE/wheels" ]; then
    die 65 "$BUNDLE is not an unpacked edge-agent bundle (no bundle.env or wheels/)"
fi
# shellcheck source=/dev/null
. "$BUNDLE/bundle.env"
if command -v sha256sum >/dev/null; then
    (cd "$BUNDLE" && sha256sum --quiet --strict -c SHA256SUMS) >&2 ||
        die 65 "the bundle's files do not match SHA256SUMS: copy the tarball again"
fi
WHEEL=$(find "$BUNDLE/wheels" -maxdepth 1 -name 'edge_agent-*.whl' | head -n 1)
[ -n "$WHEEL" ] || die 65 "no edge_agent wheel in $BUNDLE/wheels"

machine=$(uname -m)
[ "$machine" = "$BUNDLE_ARCH" ] ||
    die 69 "this bundle is for $BUNDLE_ARCH, this node is $machine: build one with PLATFORM=manylinux_2_36_$machine"
command -v "$PYTHON" >/dev/null || die 69 "$PYTHON not found: install Python 3.${BUNDLE_PYTHON_TAG#cp3}"
tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
[ "$tag" = "$BUNDLE_PYTHON_TAG" ] ||
    die 69 "$PYTHON is $tag, this bundle's wheels are for $BUNDLE_PYTHON_TAG: use --python, or build the bundle with PYTHON_VERSION=${tag:2:1}.${tag:3}"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null ||
    die 69 "$PYTHON cannot make a virtual environment: install python3-venv (Debian/Ubuntu) first"

if [ "$LIVE" = 1 ] && [ "$(id -u)" != 0 ]; then
    die 77 "run as root (or stage with --destdir DIR)"
fi

ROOT_PREFIX=$DESTDIR$PREFIX
MARKER=$ROOT_PREFIX/.edge-agent-install
if [ -d "$ROOT_PREFIX" ] && [ ! -f "$MARKER" ] && [ -n "$(ls -A "$ROOT_PREFIX")" ]; then
    die 73 "$ROOT_PREFIX exists and is not an edge-agent install: remove it or choose --prefix"
fi
upgrade=0
[ -f "$MARKER" ] && upgrade=1

say "installing edge-agent $BUNDLE_VERSION ($BUNDLE_PYTHON_TAG, $BUNDLE_ARCH) into $ROOT_PREFIX"

# --- The account and directories (live system only) ----------------------------------------
install -d -m 0755 "$DESTDIR$SYSUSERS_DIR" "$DESTDIR$TMPFILES_DIR"
install -m 0644 "$BUNDLE/systemd/edge-agent.sysusers" "$DESTDIR$SYSUSERS_DIR/edge-agent.conf"
install -m 0644 "$BUNDLE/systemd/edge-agent.tmpfiles" "$DESTDIR$TMPFILES_DIR/edge-agent.conf"
if [ "$LIVE" = 1 ]; then
    if command -v systemd-sysusers >/dev/null; then
        systemd-sysusers "$SYSUSERS_DIR/edge-agent.conf"
    elif ! getent passwd edge-agent >/dev/null; then
        # No systemd-sysusers (a container image, an older system): the same account by hand.
        useradd --system --user-group --home-dir /var/lib/edge-agent --no-create-home \
            --shell /usr/sbin/nologin --comment "edge-agent inference daemon" edge-agent
    fi
    if command -v systemd-tmpfiles >/dev/null; then
        systemd-tmpfiles --create "$TMPFILES_DIR/edge-agent.conf"
    else
        install -d -m 0755 -o root -g root /etc/edge-agent
        install -d -m 0700 -o edge-agent -g edge-agent /var/lib/edge-agent
        install -d -m 0750 -o edge-agent -g edge-agent /var/cache/edge-agent
    fi
    say "user edge-agent and its directories are in place"
fi

# --- The virtual environment -------------------------------------------------------------
# The marker goes in first, so an install that fails half-way can simply be run again.
write_marker() {
    cat >"$MARKER" <<EOF
# Written by edge-agent's install.sh; uninstall.sh removes this directory only when it finds this file.
STATE=$1
VERSION=$BUNDLE_VERSION
PYTHON_TAG=$BUNDLE_PYTHON_TAG
ARCH=$BUNDLE_ARCH
EXTRAS=${BUNDLE_EXTRAS:-}
EOF
}
install -d -m 0755 "$ROOT_PREFIX"
write_marker installing
venv_ok=0
if [ -x "$ROOT_PREFIX/bin/python" ] &&
    [ "$("$ROOT_PREFIX/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")' 2>/dev/null)" = "$tag" ]; then
    venv_ok=1
fi
if [ "$venv_ok" = 0 ]; then
    # A venv from another Python (or a broken one) cannot take these wheels: start afresh.
    "$PYTHON" -m venv --clear "$ROOT_PREFIX"
    write_marker installing # --clear emptied the directory
fi
extras=""
[ -z "${BUNDLE_EXTRAS:-}" ] || extras="[$BUNDLE_EXTRAS]"
# Only the bundle: no index, and no site pip.conf adding find-links or constraints.
pip_offline() {
    env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT -u PIP_REQUIREMENT \
        PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
        "$ROOT_PREFIX/bin/python" -m pip "$@"
}
# --upgrade-strategy eager with --no-index: every dependency at the bundle's version.
pip_offline install -q --no-index --find-links "$BUNDLE/wheels" --upgrade --upgrade-strategy eager "$WHEEL$extras"
# The same version rebuilt is still this bundle's code: reinstall the agent itself.
pip_offline install -q --no-index --no-deps --force-reinstall "$WHEEL"
"$ROOT_PREFIX/bin/edge-agent" --help >/dev/null
install -d -m 0755 "$ROOT_PREFIX/share/edge-agent"
install -m 0644 "$BUNDLE/config.toml.sample" "$ROOT_PREFIX/share/edge-agent/config.toml.sample"
install -m 0755 "$BUNDLE/uninstall.sh" "$ROOT_PREFIX/uninstall.sh"
write_marker installed
say "agent installed: $ROOT_PREFIX/bin/edge-agent"

# --- The unit ----------------------------------------------------------------------------
install -d -m 0755 "$DESTDIR$UNIT_DIR"
unit_tmp=$(mktemp)
sed "s|/opt/edge-agent/bin/edge-agent|$PREFIX/bin/edge-agent|" "$BUNDLE/systemd/edge-agent.service" >"$unit_tmp"
install -m 0644 "$unit_tmp" "$DESTDIR$UNIT_DIR/edge-agent.service"
rm -f "$unit_tmp"
say "unit installed: $DESTDIR$UNIT_DIR/edge-agent.service"

# --- The configuration: never overwritten ---------------------------------------------------
install -d -m 0755 "$DESTDIR$CONFIG_DIR"
config=$DESTDIR$CONFIG_DIR/config.toml
if [ -e "$config" ]; then
    say "kept the existing $config (the sample is in $PREFIX/share/edge-agent/)"
else
    if [ "$LIVE" = 1 ]; then
        # It may come to hold api_token: readable by the service's group, nobody else.
        install -m 0640 -o root -g edge-agent "$BUNDLE/config.toml.sample" "$config"
    else
        install -m 0640 "$BUNDLE/config.toml.sample" "$config"
    fi
    say "config written: $config (every setting at its default; edit it, then restart)"
fi

# --- systemd ------------------------------------------------------------------------------
if [ "$LIVE" = 0 ]; then
    say "staged under $DESTDIR; nothing started (no systemctl with --destdir)"
    exit 0
fi
if [ ! -d /run/systemd/system ]; then
    say "systemd is not running here: start the agent with $PREFIX/bin/edge-agent run"
    exit 0
fi
systemctl daemon-reload
if [ "$START" = 0 ]; then
    say "not started (--no-start): systemctl enable --now edge-agent"
elif [ "$upgrade" = 1 ] && systemctl is-active --quiet edge-agent; then
    say "restarting the running agent (upgrade; state in /var/lib/edge-agent is kept)"
    systemctl restart edge-agent || die 1 "edge-agent did not come back: journalctl -u edge-agent -e"
else
    say "starting edge-agent (returns once the models are loaded and warm)"
    systemctl enable --now edge-agent || die 1 "edge-agent did not start: journalctl -u edge-agent -e"
fi
say "done: systemctl status edge-agent; curl http://127.0.0.1:8080/v2/health/ready"
