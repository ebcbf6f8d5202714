#!/usr/bin/env bash
# build-image.sh — build the DaemonSet's node image (scripts/k8s/Dockerfile) from this tree.
#
#   scripts/k8s/build-image.sh [--base IMAGE | --debootstrap] [--offline] [TAG]
#
# TAG defaults to localhost/tencrypt/tencrypt:dev. The builder is podman (else docker).
#   --base IMAGE   a Debian 12 image to build on (default: debian:bookworm-slim from Docker Hub)
#   --debootstrap  no registry at hand: make a minimal Debian 12 root with debootstrap and
#                  import it as localhost/tencrypt/debian:bookworm (once), and build on that
#   --offline      the build container gets no PyPI: wheels of Tencrypt and its dependencies
#                  are made here first (this machine's pip and its certificates) and handed to
#                  the build (also what a build behind a TLS-intercepting proxy needs)
# The working tree is built as it is, uncommitted changes included. Progress goes to stderr;
# the last line on stdout is the image's tag.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
die() { echo "build-image: $*" >&2; exit 2; }
say() { echo "build-image: $*" >&2; }

repo=$(cd "$(dirname "$0")/../.." && pwd)
base="" debootstrap=0 offline=0 tag=localhost/tencrypt/tencrypt:dev
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage 0 ;;
        --base) [ $# -ge 2 ] || die "--base needs an image"; base=$2; shift 2 ;;
        --debootstrap) debootstrap=1; shift ;;
        --offline) offline=1; shift ;;
        -*) die "unknown option $1" ;;
        *) tag=$1; shift ;;
    esac
done
[ -z "$base" ] || [ "$debootstrap" = 0 ] || die "--base and --debootstrap exclude each other"

if command -v podman >/dev/null; then
    # runc, cgroupfs and fixed rlimits: what podman needs on a host with hybrid cgroups (crun
    # refuses them), no systemd, and file limits it may not raise (harmless elsewhere)
    build=(podman $(command -v runc >/dev/null && echo --runtime runc) --cgroup-manager cgroupfs
           build --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
    exists() { podman image exists "$1"; }
    import() { podman import "$@"; }
elif command -v docker >/dev/null; then
    build=(docker build)
    exists() { docker image inspect "$1" >/dev/null 2>&1; }
    import() { docker import "$@"; }
else
    die "neither podman nor docker found"
fi

if [ "$debootstrap" = 1 ]; then
    base=localhost/tencrypt/debian:bookworm
    if ! exists "$base"; then
        command -v debootstrap >/dev/null || die "debootstrap not installed (apt-get install debootstrap)"
        root=$(mktemp -d)
        trap 'rm -rf "$root"' EXIT
        say "debootstrap: a minimal Debian 12 root (a few minutes) ..."
        debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >&2
        rm -rf "$root"/var/cache/apt/archives/*.deb
        tar -C "$root" -c . | import - "$base" >&2
        say "imported $base"
    fi
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx" ${root:+"$root"}' EXIT
tar -C "$repo" --exclude=__pycache__ --exclude='*.egg-info' -c pyproject.toml setup.py README.md \
    tencrypt scripts | tar -C "$ctx" -x
args=()
[ -z "$base" ] || args+=(--build-arg "BASE_IMAGE=$base")
if [ "$offline" = 1 ]; then
    pip=$repo/.venv/bin/pip
    [ -x "$pip" ] || pip=$(command -v pip3) || die "pip not found for --offline"
    say "wheels of tencrypt and its dependencies ..."
    "$pip" wheel --quiet --wheel-dir "$ctx/scripts/k8s/wheels" "$repo" setuptools wheel >&2
    args+=(--build-arg "PIP_ARGS=--no-index --find-links /src/scripts/k8s/wheels")
fi
say "building $tag ..."
"${build[@]}" -f "$ctx/scripts/k8s/Dockerfile" -t "$tag" "${args[@]}" "$ctx" >&2
echo "$tag"
