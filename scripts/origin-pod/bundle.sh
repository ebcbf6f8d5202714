#!/bin/sh
# bundle.sh DEST SRC [PIP-ARGS...] — build a self-contained Tencrypt under DEST (/opt/tencrypt)
# that runs on any Linux base image of the same CPU architecture, whatever its libc (or none):
#
#   DEST/bin/python3.11         the interpreter; its ELF interpreter and RPATH point into DEST
#   DEST/bin/nft                nftables (strict mode's firewall), patched the same way
#   DEST/bin/iptables, ip6tables  iptables-nft (xtables-nft-multi): standalone strict mode's
#                               NFQUEUE rule; its extensions in DEST/lib/xtables (the entry
#                               point sets XTABLES_LIBDIR)
#   DEST/lib/                   the dynamic loader and every shared library those need
#   DEST/lib/python3.11/        the standard library (CPython finds it from bin/../lib)
#   DEST/lib/python3/dist-packages/  Tencrypt and its dependencies (Debian's site path)
#   DEST/entrypoint.py          the pod entry point
#
# Nothing in the base image is used and nothing leaks into it: no LD_LIBRARY_PATH, no
# /etc/ld.so.conf entry. Run on Debian bookworm (python3.11, nftables, iptables, patchelf, pip).
set -eu
DEST=$1 SRC=$2
shift 2
PY=python3.11

mkdir -p "$DEST/bin" "$DEST/lib/python3/dist-packages"

# 1. interpreter, standard library (dereferenced: Debian symlinks some files into /etc)
cp -L "/usr/bin/$PY" "$DEST/bin/$PY"
cp -rL "/usr/lib/$PY" "$DEST/lib/$PY"
rm -rf "$DEST/lib/$PY/test" "$DEST/lib/$PY/idlelib" "$DEST/lib/$PY/tkinter"
find "$DEST/lib/$PY" -name '__pycache__' -prune -exec rm -rf {} +
ln -sf "$PY" "$DEST/bin/python3"
cp -L /usr/sbin/nft "$DEST/bin/nft"
cp -L /usr/sbin/xtables-nft-multi "$DEST/bin/xtables-nft-multi"
ln -sf xtables-nft-multi "$DEST/bin/iptables"  # it dispatches on its name
ln -sf xtables-nft-multi "$DEST/bin/ip6tables"
xt=$(dirname "$(find /usr/lib -name libxt_NFQUEUE.so | head -n1)")
mkdir -p "$DEST/lib/xtables"
for ext in libxt_NFQUEUE libxt_conntrack libxt_tcp libxt_udp libxt_standard libipt_standard \
           libip6t_standard; do
    [ -e "$xt/$ext.so" ] && cp -L "$xt/$ext.so" "$DEST/lib/xtables/"
done

# 2. Tencrypt and what the pod needs of its dependencies (manylinux wheels: they need only
#    the libc we ship). The kubernetes client is for node-sync on the node, not for pods.
deps=$("$PY" -c '
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
print(" ".join(d.replace(" ", "") for d in deps if not d.startswith("kubernetes")))
' "$SRC/pyproject.toml")
pip_install() {
    "$PY" -m pip install --no-cache-dir --break-system-packages --no-compile \
        --target "$DEST/lib/python3/dist-packages" "$@"
}  # compiled below, once, with the standard library
# shellcheck disable=SC2086  # $deps is a list of requirement words on purpose
pip_install "$@" $deps
pip_install "$@" --no-deps "$SRC"
rm -rf "$DEST/lib/python3/dist-packages/bin"
cp "$SRC/scripts/origin-pod/entrypoint.py" "$DEST/entrypoint.py"

# 2b. bytecode for everything, checked against its source's hash (copies change mtimes): a
#     proxy that had to compile its modules at every start carried ~0.6 MB more, and started
#     slower, in a pod that may not write __pycache__ at all
"$PY" -m compileall -q -j 0 --invalidation-mode checked-hash "$DEST/lib/$PY" \
    "$DEST/lib/python3/dist-packages"

# 3. the loader and the libraries every ELF file under DEST needs, found by this system's ldd
elves=$(find "$DEST" -type f \( -name '*.so*' -o -path "$DEST/bin/*" \) -exec sh -c \
    'head -c4 "$1" | grep -q "ELF" && echo "$1"' _ {} \;)
for f in $elves; do
    ldd "$f" 2>/dev/null | awk '/=> \//{print $3} /^\t\/.*ld-linux/{print $1}'
done | sort -u | while read -r lib; do
    case $lib in "$DEST"/*) continue ;; esac  # wheels' own libraries ($ORIGIN) stay put
    [ -e "$DEST/lib/$(basename "$lib")" ] || cp -L "$lib" "$DEST/lib/"
done
loader=$(cd "$DEST/lib" && ls ld-linux-*.so.* | head -n1)

# 4. point the executables at the bundled loader and libraries (RPATH, not RUNPATH: it also
#    applies to the libraries they load, and to extension modules loaded with dlopen)
for exe in "$DEST/bin/$PY" "$DEST/bin/nft" "$DEST/bin/xtables-nft-multi"; do
    patchelf --set-interpreter "$DEST/lib/$loader" --force-rpath --set-rpath "$DEST/lib" "$exe"
done

# 5. check: the bundle runs with nothing but itself (env -i: no PATH, no LD_* help)
env -i "$DEST/bin/$PY" -c "import tencrypt.cli, cryptography, numpy, pyroute2"
env -i "$DEST/bin/nft" --version
env -i XTABLES_LIBDIR="$DEST/lib/xtables" "$DEST/bin/iptables" --version
echo "bundle.sh: $(du -sh "$DEST" | cut -f1) in $DEST"
