#!/bin/sh
# Where regtee's request path spends its instructions, under callgrind (instruction counts are
# repeatable on a noisy machine, unlike times): per manifest HEAD (500 on one connection), and
# per MiB of a 64 MiB blob pushed and pulled. The upstream is a real docker-registry; the
# client is curl. Prints totals per request and per MiB, and the top functions of each.
#
# Run: cargo build --release && sh benches/callgrind.sh
# Needs: valgrind, curl, docker-registry.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/target/release/regtee"
work=$(mktemp -d)
cleanup() {
    kill "$registry_pid" "$regtee_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] && echo "kept $work" || rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { i=0; until curl -s -o /dev/null "http://127.0.0.1:$1/v2/"; do i=$((i+1)); [ $i -lt 600 ] || exit 1; sleep 0.1; done; }

reg_port=$(free_port)
proxy_port=$(free_port)
mkdir -p "$work/data"
cat > "$work/registry.yml" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/data}, maintenance: {uploadpurging: {enabled: false}}}
http: {addr: 127.0.0.1:$reg_port, secret: callgrind}
EOF
docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
registry_pid=$!
cat > "$work/regtee.toml" <<EOF
[proxy]
listen = "127.0.0.1:$proxy_port"
[upstream]
url = "http://127.0.0.1:$reg_port"
[state]
dir = "$work/state"
EOF
RUST_LOG=info valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file="$work/cg.out" "$bin" serve --config "$work/regtee.toml" \
    > "$work/regtee.log" 2>&1 &
regtee_pid=$!
wait_port "$reg_port"
wait_port "$proxy_port"

direct="http://127.0.0.1:$reg_port"
proxy="http://127.0.0.1:$proxy_port"
upload() { # base repo file -> pushes the file as a blob
    digest="sha256:$(sha256sum "$3" | cut -d' ' -f1)"
    location=$(curl -s -D - -o /dev/null -X POST "$1/v2/$2/blobs/uploads/" | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
    case "$location" in /*) location="$1$location" ;; esac
    case "$location" in *\?*) sep='&' ;; *) sep='?' ;; esac
    curl -s -f -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' \
        --data-binary "@$3" "$location${sep}digest=$digest"
}

# A manifest to HEAD, stored directly.
printf '{}' > "$work/config.json"
upload "$direct" bench/heads "$work/config.json"
config_digest="sha256:$(sha256sum "$work/config.json" | cut -d' ' -f1)"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":2},"layers":[]}' \
    "$config_digest" > "$work/manifest.json"
curl -s -f -o /dev/null -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
    --data-binary "@$work/manifest.json" "$direct/v2/bench/heads/manifests/1"
head -c $((64 * 1024 * 1024)) /dev/urandom > "$work/blob"
blob_digest="sha256:$(sha256sum "$work/blob" | cut -d' ' -f1)"

# Warm up (connection pools, lazy statics), then measure each part on its own.
curl -s -I -H 'Accept: application/vnd.oci.image.manifest.v1+json' "$proxy/v2/bench/heads/manifests/1" > /dev/null
measure() { # name command...
    name=$1; shift
    callgrind_control -i on "$regtee_pid" > /dev/null 2>&1
    "$@"
    callgrind_control -i off "$regtee_pid" > /dev/null 2>&1
    callgrind_control -d "$name" "$regtee_pid" > /dev/null 2>&1
}
heads() {
    set --
    i=0
    while [ $i -lt 500 ]; do set -- "$@" "$proxy/v2/bench/heads/manifests/1"; i=$((i+1)); done
    curl -s -I -H 'Accept: application/vnd.oci.image.manifest.v1+json' "$@" > /dev/null
}
measure head heads
measure push upload "$proxy" bench/blob "$work/blob"
measure pull curl -s -f -o /dev/null "$proxy/v2/bench/blob/blobs/$blob_digest"
sleep 1

total() { callgrind_annotate "$1" 2>/dev/null | sed -n 's/^ *\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ','; }
for part in head push pull; do
    file=$(grep -l "^desc: Trigger: Client Request: $part\$\|^desc: Trigger: .*$part" "$work"/cg.out.* | head -1)
    n=$(total "$file")
    case $part in
        head) echo "HEAD manifest: $((n / 500)) instructions per request" ;;
        *) echo "$part 64 MiB: $((n / 64)) instructions per MiB" ;;
    esac
    callgrind_annotate --inclusive=no "$file" 2>/dev/null | sed -n '/^-* *$/,$p' | grep -E '^ *[0-9,]+ ' | head -12 | sed 's/^/    /'
done
