#!/usr/bin/env bash
# edge-agent uninstaller: removes what install.sh installed. Shipped in the bundle and
# installed as /opt/edge-agent/uninstall.sh. docs/DEPLOY.md, "Uninstall".
set -Eeuo pipefail  # -E: the ERR trap below also fires inside functions

usage() {
    cat <<'EOF'
Usage: uninstall.sh [--purge] [--prefix DIR] [--destdir DIR]

Stops and disables edge-agent.service, then removes
  PREFIX (/opt/edge-agent)                 the agent's virtual environment
  /etc/systemd/system/edge-agent.service   the unit
  /usr/lib/sysusers.d/edge-agent.conf, /usr/lib/tmpfiles.d/edge-agent.conf
and keeps, unless --purge:
  /etc/edge-agent                          config.toml, keys, credentials
  /var/lib/edge-agent                      stored models, desired state, api-token
  /var/cache/edge-agent                    compiled modules (disposable)
  /etc/systemd/system/edge-agent.service.d site drop-ins (systemctl edit)
  the edge-agent user and group
so a later install.sh picks up where this one left off. Running it again is safe.

Options:
  --purge          remove the configuration, the state, the cache, the drop-ins and
                   the edge-agent user as well: the node forgets every model
  --prefix DIR     where install.sh put the agent (default /opt/edge-agent) [env PREFIX]
  --destdir DIR    act on a tree staged with install.sh --destdir DIR; touch nothing on
                   the live system; needs no root                         [env DESTDIR]
  -h, --help       this text

Exit codes: 0 removed (or nothing was installed); 64 bad usage; 73 PREFIX holds
something install.sh did not put there (left alone); 77 not root; 1 a step failed.
EOF
}

say() { printf 'uninstall.sh: %s\n' "$*"; }
die() {
    local code=$1
    shift
    printf 'uninstall.sh: error: %s\n' "$*" >&2
    exit "$code"
}
on_error() {
    local rc=$?
    printf 'uninstall.sh: error: step failed (exit %s) at line %s: %s\n' "$rc" "$1" "$BASH_COMMAND" >&2
}
trap 'on_error $LINENO' ERR

PREFIX=${PREFIX:-/opt/edge-agent}
DESTDIR=${DESTDIR:-}
PURGE=0
while [ $# -gt 0 ]; do
    case $1 in
    --purge) PURGE=1 ;;
    --prefix) [ $# -ge 2 ] || die 64 "--prefix needs a directory"; PREFIX=$2; shift ;;
    --prefix=*) PREFIX=${1#*=} ;;
    --destdir) [ $# -ge 2 ] || die 64 "--destdir needs a directory"; DESTDIR=$2; shift ;;
    --destdir=*) DESTDIR=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    *) printf 'uninstall.sh: error: unknown argument %s\n\n' "$1" >&2; usage >&2; exit 64 ;;
    esac
    shift
done
case $PREFIX in
/?*) PREFIX=${PREFIX%/} ;;
*) die 64 "--prefix must be an absolute path other than /, got '$PREFIX'" ;;
esac
if [ -n "$DESTDIR" ]; then
    [ -d "$DESTDIR" ] || { say "nothing staged in $DESTDIR; nothing to do"; exit 0; }
    DESTDIR=$(cd "$DESTDIR" && pwd)
fi

UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
CONFIG_DIR=${CONFIG_DIR:-/etc/edge-agent}
STATE_DIR=${STATE_DIR:-/var/lib/edge-agent}
CACHE_DIR=${CACHE_DIR:-/var/cache/edge-agent}
SYSUSERS_DIR=${SYSUSERS_DIR:-/usr/lib/sysusers.d}
TMPFILES_DIR=${TMPFILES_DIR:-/usr/lib/tmpfiles.d}
LIVE=1
[ -z "$DESTDIR" ] || LIVE=0

if [ "$LIVE" = 1 ] && [ "$(id -u)" != 0 ]; then
    die 77 "run as root (or act on a staged tree with --destdir DIR)"
fi

ROOT_PREFIX=$DESTDIR$PREFIX
unit=$DESTDIR$UNIT_DIR/edge-agent.service
# Checked before anything is touched: a PREFIX someone else owns is left as it is.
if [ -e "$ROOT_PREFIX" ] && [ ! -f "$ROOT_PREFIX/.edge-agent-install" ]; then
    die 73 "$ROOT_PREFIX was not made by install.sh (no .edge-agent-install): left alone"
fi

removed=0
# --- The service ---------------------------------------------------------------------------
if [ "$LIVE" = 1 ] && [ -d /run/systemd/system ]; then
    if [ -e "$unit" ] || systemctl cat edge-agent.service >/dev/null 2>&1; then
        say "stopping and disabling edge-agent.service"
        systemctl disable --now edge-agent.service || say "warning: could not stop edge-agent.service (going on)"
    fi
fi
if [ -e "$unit" ]; then
    rm -f "$unit"
    say "removed $unit"
    removed=1
fi

# --- The agent ------------------------------------------------------------------------------
if [ -d "$ROOT_PREFIX" ]; then
    rm -rf "$ROOT_PREFIX"
    say "removed $ROOT_PREFIX"
    removed=1
fi
for snippet in "$DESTDIR$SYSUSERS_DIR/edge-agent.conf" "$DESTDIR$TMPFILES_DIR/edge-agent.conf"; do
    if [ -e "$snippet" ]; then
        rm -f "$snippet"
        say "removed $snippet"
        removed=1
    fi
done
if [ "$LIVE" = 1 ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl reset-failed edge-agent.service >/dev/null 2>&1 || true
fi

# --- Configuration, state, user: only with --purge ----------------------------------------------
kept=()
for dir in "$DESTDIR$CONFIG_DIR" "$DESTDIR$STATE_DIR" "$DESTDIR$CACHE_DIR" "$DESTDIR$UNIT_DIR/edge-agent.service.d"; do
    [ -e "$dir" ] || continue
    if [ "$PURGE" = 1 ]; then
        rm -rf "$dir"
        say "purged $dir"
        removed=1
    else
        kept+=("$dir")
    fi
done
if [ "$LIVE" = 1 ] && getent passwd edge-agent >/dev/null; then
    if [ "$PURGE" = 1 ]; then
        userdel edge-agent
        say "removed the user edge-agent"
        removed=1
    else
        kept+=("the user edge-agent")
    fi
fi
if [ "$LIVE" = 1 ] && [ "$PURGE" = 1 ] && getent group edge-agent >/dev/null; then
    groupdel edge-agent
fi

if [ "$removed" = 0 ]; then
    say "edge-agent is not installed (nothing under $ROOT_PREFIX, no unit); nothing to do"
fi
if [ ${#kept[@]} -gt 0 ]; then
    say "kept (uninstall.sh --purge removes them): $(printf '%s, ' "${kept[@]}" | sed 's/, $//')"
fi
say "done"
