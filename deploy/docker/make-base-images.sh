#!/usr/bin/env bash
# Builds the two base images deploy/docker/Dockerfile starts from, out of Debian's own packages,
# for machines that cannot pull from a container registry:
#   autoglm-base/debian:bookworm       debootstrap --variant=minbase bookworm (the build stage's base)
#   autoglm-base/debian:bookworm-slim  the same, without docs, man pages and locales, and with
#                                      dpkg told to skip them from then on (the runtime's base)
# Both have the apt sources of Docker Hub's debian:bookworm (bookworm, bookworm-updates and
# bookworm-security), so the Dockerfile behaves the same on them and on the registry's images.
# Then: docker build --build-arg BUILDER_IMAGE=autoglm-base/debian:bookworm \
#         --build-arg RUNTIME_IMAGE=autoglm-base/debian:bookworm-slim ...   (docs/DEPLOY.md, 2)
#
# Usage (as root: debootstrap needs it): deploy/docker/make-base-images.sh [--force]
# Skips everything when both images exist already (--force makes them again). Environment:
#   MIRROR           Debian mirror (default http://deb.debian.org/debian)
#   SECURITY_MIRROR  security mirror (default http://deb.debian.org/debian-security)
#   BUILDER_TAG, RUNTIME_TAG  the image names (defaults above); DOCKER  the docker client
set -euo pipefail

SUITE=bookworm
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
BUILDER_TAG=${BUILDER_TAG:-autoglm-base/debian:$SUITE}
RUNTIME_TAG=${RUNTIME_TAG:-autoglm-base/debian:$SUITE-slim}
DOCKER=${DOCKER:-docker}

force=0
case "${1:-}" in
  --force) force=1 ;;
  "") ;;
  *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

exists() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }
if [ "$force" = 0 ] && exists "$BUILDER_TAG" && exists "$RUNTIME_TAG"; then
  echo "base images $BUILDER_TAG and $RUNTIME_TAG exist; nothing to do (--force makes them again)"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "error: debootstrap needs root; run $0 as root (or with sudo)" >&2
  exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  echo "error: debootstrap is not installed (apt-get install debootstrap)" >&2
  exit 1
fi

start=$SECONDS
rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/autoglm-rootfs.XXXXXX")
cleanup() {
  # debootstrap mounts /proc and /sys inside while it runs; a run cut short can leave them.
  for m in proc sys dev/pts dev; do
    mountpoint -q "$rootfs/$m" 2>/dev/null && umount -l "$rootfs/$m" || true
  done
  rm -rf --one-file-system "$rootfs"
}
trap cleanup EXIT

echo "== debootstrap --variant=minbase $SUITE ($MIRROR) into $rootfs"
debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || {
  tail -30 "$rootfs.log" >&2
  rm -f "$rootfs.log"
  echo "error: debootstrap failed" >&2
  exit 1
}
rm -f "$rootfs.log"

# What Docker Hub's debian image has beside the packages (debuerreotype's choices).
rm -f "$rootfs/etc/apt/sources.list"
cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
# No downloaded .debs kept after an install; no services started by package scripts.
cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
cat >"$rootfs/etc/apt/apt.conf.d/docker-no-languages" <<'EOF'
Acquire::Languages "none";
EOF
printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
chmod 755 "$rootfs/usr/sbin/policy-rc.d"
# Docker provides these per container.
rm -f "$rootfs/etc/hostname" "$rootfs/etc/resolv.conf" "$rootfs/etc/machine-id"
: >"$rootfs/etc/resolv.conf"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
  "$rootfs"/var/log/apt/* "$rootfs"/var/log/dpkg.log "$rootfs"/var/log/bootstrap.log "$rootfs"/tmp/* \
  "$rootfs"/var/tmp/* "$rootfs"/root/.bash_history

import() {
  local tag=$1
  tar --numeric-owner --xattrs -C "$rootfs" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    --message "debootstrap --variant=minbase $SUITE $MIRROR (deploy/docker/make-base-images.sh)" \
    - "$tag" >/dev/null
}

echo "== import $BUILDER_TAG"
import "$BUILDER_TAG"

# The slim variant: what Docker Hub's -slim drops (documentation, man pages, locales; copyright
# files stay), and dpkg keeps them out of packages installed later.
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/groff/* "$rootfs"/usr/share/info/* \
  "$rootfs"/usr/share/lintian/* "$rootfs"/usr/share/linda/*
find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +

echo "== import $RUNTIME_TAG"
import "$RUNTIME_TAG"

"$DOCKER" image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -F "${BUILDER_TAG%%:*}:" || true
echo "base images made in $((SECONDS - start)) s"
