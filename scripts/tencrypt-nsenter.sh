#!/usr/bin/env bash
# tencrypt-nsenter.sh — the node-side launcher: put Tencrypt into one pod's network namespace.
#
#   tencrypt-nsenter.sh PID          [--undo | --setup-only] [-- RUN-ARGS...]
#   tencrypt-nsenter.sh --netns NAME [--undo | --setup-only] [-- RUN-ARGS...]
#
# PID is any process of the pod (e.g. its infrastructure container); NAME a named network
# namespace (`ip netns`). Runs `tencrypt setup` inside the pod's network namespace, then replaces
# itself with `tencrypt run RUN-ARGS` there (foreground: a supervisor — systemd, the agent, the
# lab — owns its lifetime). With --undo it runs `tencrypt setup --undo` instead (stop the proxy
# first). With --setup-only it runs `tencrypt setup` and exits: the proxy is started by its
# caller, a process about to become it (a child of the agent's zygote, tencrypt/linux/zygote.py,
# already in the pod's namespace; it is the one moved into the pod's cgroups, if asked). Only
# the network namespace is entered: tencrypt itself comes from the node. The pod's
# resolv.conf is the one PID sees (`setup --resolv-conf-of PID`: through /proc/PID/root, or the
# node's file behind it where the runtime mounts it read-only) or /etc/netns/NAME (named mode,
# which `ip netns exec` bind-mounts over /etc/resolv.conf).
#
# Environment: TENCRYPT_BIN (default: `tencrypt` on PATH), TENCRYPT_SETUP_ARGS (extra words for
# `tencrypt setup`, e.g. "--service-cidr 10.96.0.0/12"), TENCRYPT_PROJECT_PSK (the project key,
# passed through to `tencrypt run`; prefer --psk-file FILE in RUN-ARGS).
set -euo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
die() { echo "tencrypt-nsenter: $*" >&2; exit 2; }

[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage 0 ;; esac
[ "$(id -u)" = 0 ] || die "must run as root on the node"

target=() resolv=()
if [ "$1" = "--netns" ]; then
    [ $# -ge 2 ] || die "--netns needs a namespace name"
    [ -e "/var/run/netns/$2" ] || die "no network namespace named '$2' (see: ip netns list)"
    target=(ip netns exec "$2")
    shift 2
else
    pid=$1
    [[ "$pid" =~ ^[0-9]+$ ]] || die "'$pid' is neither a PID nor --netns NAME"
    [ -e "/proc/$pid/ns/net" ] || die "no process $pid"
    target=(nsenter --target "$pid" --net --)
    # the resolv.conf the pod sees; setup finds the node's file behind a read-only bind mount
    # (containerd, CRI-O); a --resolv-conf in TENCRYPT_SETUP_ARGS names the file instead
    [[ " ${TENCRYPT_SETUP_ARGS:-} " == *" --resolv-conf "* ]] || resolv=(--resolv-conf-of "$pid")
    shift
fi

undo=0 setup_only=0
if [ "${1:-}" = "--undo" ]; then undo=1; shift
elif [ "${1:-}" = "--setup-only" ]; then setup_only=1; shift; fi
if [ $# -gt 0 ]; then
    [ "$1" = "--" ] || die "unexpected argument '$1' (run arguments go after --)"
    shift
fi

bin=${TENCRYPT_BIN:-$(command -v tencrypt || true)}
[ -n "$bin" ] && [ -x "$bin" ] || die "tencrypt not found: install it or set TENCRYPT_BIN"

if [ "$undo" = 1 ]; then
    # shellcheck disable=SC2086  # the same setup words, so a custom --state-dir is found again
    exec "${target[@]}" "$bin" setup --undo ${TENCRYPT_SETUP_ARGS:-}
fi
# shellcheck disable=SC2086  # TENCRYPT_SETUP_ARGS is a list of words on purpose
"${target[@]}" "$bin" setup "${resolv[@]}" ${TENCRYPT_SETUP_ARGS:-}
# the node agent's --proxy-cgroup sandbox: this process, about to become the proxy, joins the
# pod's cgroups first, so all of the proxy's memory is charged there and it outlives the
# agent container (tencrypt/agent/cgroups.py); a failure is logged there and not fatal
proxy=$$
[ "$setup_only" = 0 ] || proxy=$PPID  # --setup-only: the caller becomes the proxy
if [ -n "${TENCRYPT_CGROUP_PYTHON:-}" ] && [ -n "${pid:-}" ]; then
    "$TENCRYPT_CGROUP_PYTHON" -m tencrypt.agent.cgroups --via-node "$proxy" "$pid" || true
fi
[ "$setup_only" = 0 ] || exit 0
exec "${target[@]}" "$bin" run "$@"
