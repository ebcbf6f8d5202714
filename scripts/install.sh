#!/usr/bin/env bash
# Installs everything Tencrypt needs on a Debian machine, as root: the system tools the lab,
# the tests and the benchmarks use, and a Python virtual environment in .venv with Tencrypt
# and its test/bench extras. Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (it installs Debian packages and the lab needs namespaces)" >&2
    exit 2
fi

# binary -> Debian package
declare -A PKGS=(
    [ip]=iproute2 [iptables]=iptables [nft]=nftables [dnsmasq]=dnsmasq-base [iperf3]=iperf3
    [tcpdump]=tcpdump [curl]=curl [dig]=dnsutils [capsh]=libcap2-bin [ps]=procps
    [killall]=psmisc [ethtool]=ethtool [nsenter]=util-linux [gcc]=gcc [ping]=iputils-ping [socat]=socat [conntrack]=conntrack
    [podman]=podman [runc]=runc [debootstrap]=debootstrap  # the node image's test
)
missing=()
for bin in "${!PKGS[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("${PKGS[$bin]}")
done
# headers the C extension tencrypt._fastpath builds against (setup.py): libcrypto's, and
# Python's (a Debian python3 needs python3-dev; a python built from source ships its own)
[ -f /usr/include/openssl/evp.h ] || missing+=(libssl-dev)
if [ -z "${PYTHON:-}" ] && [ ! -f "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then
    missing+=(python3-dev)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install.sh: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# binary -> Debian package it is taken out of, not installed: the tests need promtool (`promtool
# check metrics` reads /metrics), and installing the prometheus package would also install a
# Prometheus server and start it (its postinst starts the service, listening on :9090), with
# a web UI's JavaScript. promtool is one self-contained binary: copied to /usr/local/bin.
declare -A EXTRACT=([promtool]=prometheus)
for bin in "${!EXTRACT[@]}"; do
    command -v "$bin" >/dev/null 2>&1 && continue
    pkg=${EXTRACT[$bin]}
    echo "install.sh: installing $bin from Debian's $pkg package (that binary only, no service)"
    tmp=$(mktemp -d)
    chown _apt "$tmp" 2>/dev/null || true  # apt-get download fetches as _apt when it can
    if ! (cd "$tmp" && apt-get download -qq "$pkg" 2>/dev/null); then
        apt-get update -qq
        (cd "$tmp" && apt-get download -qq "$pkg")
    fi
    dpkg-deb --fsys-tarfile "$tmp/$pkg"_*.deb | tar -x -C "$tmp" "./usr/bin/$bin"
    install -m 0755 "$tmp/usr/bin/$bin" "/usr/local/bin/$bin"
    rm -rf "$tmp"
done

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "install.sh: Python 3.11 or newer is needed (found $("$PY" --version 2>&1))" >&2
    exit 2
fi
if [ ! -x .venv/bin/python ]; then
    echo "install.sh: creating .venv"
    "$PY" -m venv .venv
fi
stamp=.venv/.tencrypt-installed
# Reinstalled when the packaging or the C source changed: the editable install builds the
# extension once, so a changed tencrypt/_fastpath*.[ch] needs this to take effect.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
    || [ -n "$(find tencrypt -maxdepth 1 -name '_fastpath*.[ch]' -newer "$stamp")" ]; then
    echo "install.sh: installing Tencrypt and its Python dependencies into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench]'
    touch "$stamp"
fi
# The compiled data path is optional to install but expected here: say so when it is missing.
if .venv/bin/python -c 'import tencrypt._fastpath' 2>/dev/null; then
    echo "install.sh: compiled data path: tencrypt._fastpath built"
else
    echo "install.sh: WARNING: tencrypt._fastpath was not built (gcc, libssl-dev, Python headers?):" \
        "the proxy runs the pure-Python data path" >&2
fi
echo "install.sh: ready ($(.venv/bin/tencrypt --version))"
