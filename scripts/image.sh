#!/usr/bin/env bash
# Builds podscope's container image without Docker or a registry: an empty base (`FROM scratch`)
# with the given podscope binary (and this machine's bpftrace) and exactly the shared libraries they
# load (from `ldd`), built by
# podman (Debian's podman + buildah). The result matches the Dockerfile's: same entrypoint,
# command, user, ports and binary path, on glibc of the machine that built the binary.
#
# Usage: scripts/image.sh PODSCOPE_BINARY [IMAGE]     (IMAGE defaults to localhost/podscope:dev)
# Needs root (podman's storage in /var/lib/containers). Prints the image name.
set -euo pipefail
BINARY=${1:?usage: scripts/image.sh PODSCOPE_BINARY [IMAGE]}
IMAGE=${2:-localhost/podscope:dev}
[ -x "$BINARY" ] || { echo "image: $BINARY is not an executable" >&2; exit 2; }

CONTEXT=$(mktemp -d)
trap 'rm -rf "$CONTEXT"' EXIT
ROOTFS=$CONTEXT/rootfs
mkdir -p "$ROOTFS/usr/bin" "$ROOTFS/tmp" "$ROOTFS/etc/podscope"
cp "$BINARY" "$ROOTFS/usr/bin/podscope"
# bpftrace for the session extension's bpftrace requests, as the Dockerfile ships it (when this
# machine has one: scripts/install-deps.sh installs it).
EXECUTABLES=("$BINARY")
if BPFTRACE=$(command -v bpftrace); then
  cp "$BPFTRACE" "$ROOTFS/usr/bin/bpftrace"
  EXECUTABLES+=("$BPFTRACE")
fi
# Each library at the path the dynamic loader looks for it (the vdso has no file).
for executable in "${EXECUTABLES[@]}"; do
  ldd "$executable" | grep -o '/[^ ]*' | while read -r library; do
    mkdir -p "$ROOTFS$(dirname "$library")"
    cp -L "$library" "$ROOTFS$library"
  done
done
chmod 1777 "$ROOTFS/tmp"

# The Dockerfile's runtime stage, on scratch instead of distroless (which adds only glibc,
# libgcc and CA certificates: the first two are copied above; exporters here use no TLS).
cat >"$CONTEXT/Containerfile" <<'EOF'
FROM scratch
COPY rootfs/ /
WORKDIR /
EXPOSE 9464 4317 4318 8888
USER 0
ENTRYPOINT ["/usr/bin/podscope"]
CMD ["run"]
EOF
podman build --quiet --network none --tag "$IMAGE" --file "$CONTEXT/Containerfile" "$CONTEXT" >&2
echo "$IMAGE"
