#!/usr/bin/env bash
# Builds regtee's container image from a built binary and exactly the libraries it links, with
# nothing fetched from anywhere: no base image, no package manager, no network.
#
#   cargo build --release && deploy/image/build.sh
#   docker load -i target/regtee-image.tar                  # or push it anywhere:
#   skopeo copy docker-archive:target/regtee-image.tar docker://registry.example.com/regtee:VERSION
#
# Options: --binary PATH (default target/release/regtee), --out FILE (default
# target/regtee-image.tar), --tag NAME:TAG (default regtee:<version in Cargo.toml>).
#
# The image: one layer holding /usr/local/bin/regtee (debug symbols stripped), its shared
# libraries and loader (from `ldd`), the host's CA bundle, /etc/passwd and /etc/group naming the
# user regtee (65532), and /var/lib/regtee owned by it. It runs as that user, `serve --config
# /etc/regtee/regtee.toml`; state under the volume /var/lib/regtee; a health check with
# `regtee health`; its version and source in OCI labels. The archive is what `docker save`
# writes (`docker load` reads it, skopeo copies it to any registry). The same inputs give the
# same bytes: every time stamp is SOURCE_DATE_EPOCH (default 0).
set -euo pipefail

here=$(cd "$(dirname "$0")/../.." && pwd)
binary="$here/target/release/regtee"
out="$here/target/regtee-image.tar"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$here/Cargo.toml" | head -n 1)
tag="regtee:$version"
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    *) echo "build.sh: unknown option $1 (--binary PATH, --out FILE, --tag NAME:TAG)" >&2; exit 64 ;;
  esac
done
if [ ! -x "$binary" ]; then
  echo "build.sh: no regtee binary at $binary: run cargo build --release first, or pass --binary" >&2
  exit 1
fi
epoch=${SOURCE_DATE_EPOCH:-0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"

# The binary and what it links, at the paths the loader looks them up by.
install -d "$root/usr/local/bin" "$root/etc/regtee" "$root/etc/ssl/certs" "$root/var/lib/regtee"
install -d -m 1777 "$root/tmp"
if command -v strip >/dev/null; then
  strip --strip-debug -o "$root/usr/local/bin/regtee" "$binary"
else
  cp "$binary" "$root/usr/local/bin/regtee"
fi
chmod 0755 "$root/usr/local/bin/regtee"
ldd "$binary" | grep -o '/[^ ]*' | while read -r library; do
  cp -L --parents "$library" "$root/"
done
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
fi
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nregtee:x:65532:65532:regtee:/var/lib/regtee:/usr/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nregtee:x:65532:\n' >"$root/etc/group"
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"

# One layer: everything root's, but the state directory, the user's.
layer="$work/layer.tar"
tar_flags=(--sort=name --numeric-owner --mtime="@$epoch" --format=gnu -C "$root")
tar "${tar_flags[@]}" --owner=0 --group=0 --exclude=./var/lib/regtee -cf "$layer" .
tar "${tar_flags[@]}" --owner=65532 --group=65532 -rf "$layer" ./var/lib/regtee
layer_digest=$(sha256sum "$layer" | cut -d' ' -f1)

created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
config="$work/config.json"
cat >"$config" <<EOF
{"architecture":"amd64","os":"linux","created":"$created",
"config":{"User":"65532:65532",
"Entrypoint":["/usr/local/bin/regtee"],
"Cmd":["serve","--config","/etc/regtee/regtee.toml"],
"WorkingDir":"/var/lib/regtee",
"Env":["PATH=/usr/local/bin:/usr/bin:/bin","SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],
"ExposedPorts":{"5000/tcp":{},"5001/tcp":{}},
"Volumes":{"/var/lib/regtee":{}},
"StopSignal":"SIGTERM",
"Healthcheck":{"Test":["CMD","/usr/local/bin/regtee","health","--config","/etc/regtee/regtee.toml"],"Interval":10000000000,"Timeout":5000000000,"StartPeriod":5000000000,"Retries":3},
"Labels":{"org.opencontainers.image.title":"regtee","org.opencontainers.image.description":"Harbor pull-through and push-mirroring proxy","org.opencontainers.image.version":"$version","org.opencontainers.image.licenses":"Apache-2.0"}},
"rootfs":{"type":"layers","diff_ids":["sha256:$layer_digest"]},
"history":[{"created":"$created","created_by":"deploy/image/build.sh"}]}
EOF
config_digest=$(sha256sum "$config" | cut -d' ' -f1)

archive="$work/archive"
install -d "$archive/$layer_digest"
mv "$layer" "$archive/$layer_digest/layer.tar"
mv "$config" "$archive/$config_digest.json"
printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]\n' \
  "$config_digest" "$tag" "$layer_digest" >"$archive/manifest.json"
mkdir -p "$(dirname "$out")"
tar --sort=name --numeric-owner --owner=0 --group=0 --mtime="@$epoch" -C "$archive" -cf "$out" .
size=$(du -b "$out" | cut -f1)
gzipped=$(gzip -c "$out" | wc -c)
echo "$tag: $out ($((size / 1048576)) MiB, $((gzipped / 1048576)) MiB compressed), image id sha256:$config_digest"
