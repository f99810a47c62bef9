#!/bin/sh
# Regenerates the committed qcow2 fixtures with QEMU's own tools (qemu-img, qemu-io).
#
# Each fixture exercises one feature of the format. For every fixture (and every internal
# snapshot) the SHA-256 of `qemu-img convert -O raw` is recorded in fixtures/SHA256SUMS, and
# `qemu-img map --output=json` in fixtures/<name>.map.json, so the reading tests can check our
# rendering byte for byte on machines without qemu-img. Patterns are simple and the virtual
# disks small, so the whole set stays a few MiB and compresses well in git.
#
# Usage: testdata/make-fixtures.sh   (needs qemu-img and qemu-io; rewrites testdata/fixtures
# and testdata/sample-chain)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=$here/fixtures
rm -rf "$out" && mkdir -p "$out"
cd "$out"

img() { qemu-img create -q -f qcow2 "$@"; }
io() { f=$1; shift; qemu-io -f qcow2 "$@" "$f" >/dev/null; }
# set_incompat FILE BIT: ORs a bit into the low byte of incompatible_features (byte 79)
set_incompat() {
    cur=$(od -An -tu1 -j79 -N1 "$1" | tr -d ' ')
    printf "\\$(printf %03o $((cur | $2)))" | dd of="$1" bs=1 seek=79 conv=notrunc status=none
}

# Version 2 (compat 0.10) image with data.
img -o compat=0.10 v2.qcow2 4M
io v2.qcow2 -c 'write -P 0x11 0 256k' -c 'write -P 0x12 1M 64k' -c 'write -P 0x13 4032k 64k'

# Version 3: data, zero clusters (plain and preallocated), discarded ranges, partial clusters.
img v3.qcow2 4M
io v3.qcow2 -c 'write -P 0x21 0 384k' -c 'write -z 128k 64k' -c 'write -z -u 256k 128k' \
    -c 'discard 448k 64k' -c 'write -P 0x22 1000k 3k' -c 'write -P 0x23 3M 128k'

# Compressed clusters, deflate and zstd, mixed with plain data.
img zlib.qcow2 4M
io zlib.qcow2 -c 'write -c -P 0x31 0 256k' -c 'write -P 0x32 512k 64k' -c 'write -c -P 0x33 1M 64k'
img -o compression_type=zstd zstd.qcow2 4M
io zstd.qcow2 -c 'write -c -P 0x41 0 256k' -c 'write -P 0x42 512k 64k' -c 'write -c -P 0x43 2M 64k'
# A whole image converted with compression (many clusters share host clusters).
qemu-img convert -c -O qcow2 -o compression_type=zstd,cluster_size=4k v3.qcow2 zstd-convert.qcow2
qemu-img convert -c -O qcow2 -o cluster_size=4k v3.qcow2 zlib-convert.qcow2

# Extended L2: subcluster writes, zero subclusters, a compressed cluster, an unaligned write.
img -o extended_l2=on,cluster_size=64k extl2.qcow2 4M
io extl2.qcow2 -c 'write -P 0x51 0 2k' -c 'write -P 0x52 6k 2k' -c 'write -z 64k 4k' \
    -c 'write -P 0x53 68k 60k' -c 'write -c -P 0x54 1M 64k' -c 'write -P 0x55 2M 64k' \
    -c 'write -z 2M 8k' -c 'write -P 0x56 3000k 5k'

# Cluster sizes at both ends of the small range, refcount widths.
img -o cluster_size=512 cs512.qcow2 1M
io cs512.qcow2 -c 'write -P 0x61 0 3k' -c 'write -P 0x62 700k 1k' -c 'write -z 1k 512'
img -o cluster_size=16k,refcount_bits=1 rc1.qcow2 2M
io rc1.qcow2 -c 'write -P 0x71 0 100k' -c 'write -P 0x72 1M 20k'
img -o refcount_bits=64,lazy_refcounts=on rc64.qcow2 2M
io rc64.qcow2 -c 'write -P 0x73 0 100k' -c 'write -P 0x74 1M 20k'

# Internal snapshots with writes between and after them.
img -o cluster_size=16k snap.qcow2 2M
io snap.qcow2 -c 'write -P 0x81 0 256k'
qemu-img snapshot -c first snap.qcow2
io snap.qcow2 -c 'write -P 0x82 64k 64k' -c 'write -z 128k 16k'
qemu-img snapshot -c second snap.qcow2
io snap.qcow2 -c 'write -P 0x83 0 32k' -c 'write -P 0x84 1M 64k'

# Backing chains: qcow2 <- qcow2 <- qcow2 (relative names), a raw backing file, a backing file
# shorter than its overlay and one longer.
img -o cluster_size=16k base.qcow2 2M
io base.qcow2 -c 'write -P 0x91 0 640k'
img -o cluster_size=16k -b base.qcow2 -F qcow2 mid.qcow2 2M
io mid.qcow2 -c 'write -P 0x92 256k 256k' -c 'write -z 512k 64k'
img -o cluster_size=32k -b mid.qcow2 -F qcow2 top.qcow2 3M
io top.qcow2 -c 'write -P 0x93 480k 64k' -c 'write -P 0x94 2560k 64k'
qemu-img create -q -f raw rawbase.raw 512k
qemu-io -f raw -c 'write -P 0xa1 0 512k' rawbase.raw >/dev/null
img -b rawbase.raw -F raw over-raw.qcow2 2M
io over-raw.qcow2 -c 'write -P 0xa2 512k 64k'
img -o cluster_size=16k -b base.qcow2 -F qcow2 short-over.qcow2 1M
io short-over.qcow2 -c 'write -P 0xa3 0 16k'

# External data files, raw and not raw (names relative to the image).
img -o data_file=datafile-raw.data,data_file_raw=on datafile-raw.qcow2 256k
io datafile-raw.qcow2 -c 'write -P 0xb1 64k 64k'
img -o data_file=datafile.data datafile.qcow2 1M
io datafile.qcow2 -c 'write -P 0xb2 512k 64k' -c 'write -P 0xb3 0 64k'

# A persistent bitmap, the dirty and corrupt bits, an odd virtual size.
img bitmap.qcow2 1M
qemu-img bitmap --add bitmap.qcow2 b0
io bitmap.qcow2 -c 'write -P 0xc1 0 64k'
img dirty.qcow2 1M
io dirty.qcow2 -c 'write -P 0xc2 0 64k'
set_incompat dirty.qcow2 1
img corrupt.qcow2 1M
io corrupt.qcow2 -c 'write -P 0xc3 0 64k'
set_incompat corrupt.qcow2 2
img odd.qcow2 1000
io odd.qcow2 -c 'write -P 0xd1 0 1k'

sums=SHA256SUMS
: > "$sums"
for f in *.qcow2 *.raw; do
    qemu-img convert -O raw "$f" "$f.tmp-raw"
    echo "$(sha256sum < "$f.tmp-raw" | cut -d' ' -f1) $f" >> "$sums"
    rm -f "$f.tmp-raw"
    qemu-img map --output=json "$f" > "$f.map.json"
    qemu-img info --output=json "$f" > "$f.info.json"
done
for s in first second; do
    qemu-img convert -O raw -l "snapshot.name=$s" snap.qcow2 snap.tmp-raw
    echo "$(sha256sum < snap.tmp-raw | cut -d' ' -f1) snap.qcow2@$s" >> "$sums"
    rm -f snap.tmp-raw
done

# The sample backup chain the README restores: a FULL and two INCs in qmpbackup's layout, the
# INCs linked to their predecessors.
chain=$here/sample-chain
rm -rf "$chain" && mkdir -p "$chain/disk.qcow2"
cd "$chain/disk.qcow2"
full=FULL-1700000000-disk.qcow2 inc1=INC-1700000600-disk.qcow2 inc2=INC-1700001200-disk.qcow2
img "$full" 8M
io "$full" -c 'write -P 0xe1 0 1M' -c 'write -P 0xe2 6M 256k'
img -b "$full" -F qcow2 "$inc1" 8M
io "$inc1" -c 'write -P 0xe3 768k 512k' -c 'write -z 6M 64k'
img -b "$inc1" -F qcow2 "$inc2" 8M
io "$inc2" -c 'write -c -P 0xe4 3M 256k'
printf 'sample-chain-0001' > "$chain/uuid"
qemu-img convert -O raw "$inc2" latest.tmp-raw
echo "$(sha256sum < latest.tmp-raw | cut -d' ' -f1) $inc2" > "$chain/SHA256SUMS"
rm -f latest.tmp-raw
du -sh "$out" "$chain"
