#!/usr/bin/env bash
# Times qmprestore against qemu-img (and qmpbackup against cp) on the same inputs, side by
# side in one run, and prints
# the median wall time of each (runs alternate, after one warm-up run each), their ratio (ours / qemu-img; below 1.0 means we are faster)
# and peak RSS. Every timing includes a final `sync` of what the command wrote.
#
# Usage: benches/compare-qemu-img.sh [filter]
#   REPS=5            repetitions per command (median reported)
#   BENCH_DIR=/path   scratch directory (default: a new one under /var/tmp; removed at exit)
#   DATA_MIB=1024     guest data in the test image
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${REPS:-5}
data_mib=${DATA_MIB:-1024}
filter=${1:-}
for tool in qemu-img /usr/bin/time; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install qemu-utils time)"; exit 2; }
done
cargo build --release --quiet
ours=$PWD/target/release/qmprestore
backup=$PWD/target/release/qmpbackup
work=${BENCH_DIR:-$(mktemp -d /var/tmp/qmpbench.XXXXXX)}
[ -n "${BENCH_DIR:-}" ] || trap 'rm -rf "$work"' EXIT
cd "$work"

# A 4 GiB disk with $data_mib MiB of incompressible data in 64 MiB pieces, spread out so
# that holes and data alternate, stored as a qcow2 image with 64 KiB clusters.
if [ ! -f img.qcow2 ]; then
    echo "preparing a 4 GiB image with $data_mib MiB of data in $work"
    truncate -s 4G src.raw
    pieces=$((data_mib / 64))
    for i in $(seq 0 $((pieces - 1))); do
        dd if=/dev/urandom of=src.raw bs=1M count=64 seek=$((i * 4096 / pieces)) conv=notrunc status=none
    done
    qemu-img convert -O qcow2 src.raw img.qcow2
    rm -f src.raw
fi

# timed OUTPUT COMMAND...: one run of COMMAND && sync after removing OUTPUT; appends
# "seconds peak_rss_kib" to the file named by $log.
timed() {
    local out=$1; shift
    rm -rf "$out"; sync
    /usr/bin/time -f '%e %M' -o time.txt sh -c '"$@" >/dev/null && sync' sh "$@"
    cat time.txt >> "$log"
}

# median LOG: "median_seconds max_rss_kib" of the runs logged in LOG.
median() {
    sort -n "$1" | awk '{t[NR]=$1; if ($2 > m) m=$2} END {print t[int((NR+1)/2)], m}'
}

# compare LABEL OUTPUT "OUR COMMAND" "THEIR COMMAND": one untimed warm-up run of each, then
# $reps runs of each, alternating, so both see the same machine state; prints a table row.
compare() {
    local label=$1 out=$2 ours_cmd=$3 theirs_cmd=$4
    : > ours.log; : > theirs.log
    log=/dev/null timed "$out" $ours_cmd; log=/dev/null timed "$out" $theirs_cmd
    for _ in $(seq "$reps"); do
        log=ours.log timed "$out" $ours_cmd
        log=theirs.log timed "$out" $theirs_cmd
    done
    rm -rf "$out"
    row "$label" "$(median ours.log)" "$(median theirs.log)"
}

size_row() { # LABEL OURS_FILE THEIRS_FILE
    awk -v l="$1" -v a="$(stat -c %s "$2")" -v b="$(stat -c %s "$3")" 'BEGIN {
        printf "%-34s %9.1fM %9.1fM %7.3f\n", l, a / 1048576, b / 1048576, a / b }'
}

row() { # LABEL OURS_RESULT THEIRS_RESULT
    read -r t1 m1 <<<"$2"; read -r t2 m2 <<<"$3"
    awk -v l="$1" -v t1="$t1" -v t2="$t2" -v m1="$m1" -v m2="$m2" 'BEGIN {
        printf "%-34s %9.2fs %9.2fs %7.2f %10.1f %10.1f\n", l, t1, t2, (t2 > 0 ? t1 / t2 : 0), m1 / 1024, m2 / 1024 }'
}

# bench_fold LABEL DIR1 CMD1 DIR2 CMD2: CMD1 against CMD2, each run on a fresh copy of its DIR
# named c (the copy is not timed; run 0 warms up).
bench_fold() {
    : > ours.log; : > theirs.log
    for i in $(seq 0 "$reps"); do
        for who in ours theirs; do
            if [ "$who" = ours ]; then src=$2 cmd=$3; else src=$4 cmd=$5; fi
            rm -rf c; cp -a "$src" c; sync
            /usr/bin/time -f '%e %M' -o time.txt sh -c "$cmd >/dev/null 2>&1 && sync"
            [ "$i" = 0 ] || cat time.txt >> "$who.log"
        done
    done
    rm -rf c
    row "$1" "$(median ours.log)" "$(median theirs.log)"
}

# A second disk whose data compresses about 2:1 (half of every 4 KiB block random, half a
# repeated text), for the compression benchmarks.
if [ ! -f half.qcow2 ]; then
    python3 - "$data_mib" <<'PY'
import os, sys
mib = int(sys.argv[1])
text = (b"qmpbackup restores qcow2 chains natively; " * 100)[:2048]
with open("half.raw", "wb") as f:
    for _ in range(mib * 256):
        f.write(os.urandom(2048) + text)
PY
    qemu-img convert -O qcow2 half.raw half.qcow2
    rm -f half.raw
fi

printf '%-34s %10s %10s %7s %10s %10s\n' operation qmprestore reference ratio "RSS MiB" "ref MiB"
if [ -z "$filter" ] || [[ convert-raw == *$filter* ]]; then
    compare "convert -O raw (${data_mib} MiB data)" out.raw \
        "$ours convert -O raw img.qcow2 out.raw" "qemu-img convert -O raw img.qcow2 out.raw"
fi
if [ -z "$filter" ] || [[ convert-qcow2 == *$filter* ]]; then
    # The physical limit: cp of the very bytes we write.
    "$ours" convert -O qcow2 img.qcow2 ref.qcow2
    compare "convert -O qcow2 vs cp" out.qcow2 \
        "$ours convert -O qcow2 img.qcow2 out.qcow2" "cp ref.qcow2 out.qcow2"
    compare "convert -O qcow2 vs qemu-img" out.qcow2 \
        "$ours convert -O qcow2 img.qcow2 out.qcow2" "qemu-img convert -O qcow2 img.qcow2 out.qcow2"
    rm -f ref.qcow2
fi
if [ -z "$filter" ] || [[ convert-zstd == *$filter* ]]; then
    compare "convert -c zstd (2:1 data)" out.qcow2 \
        "$ours convert -O qcow2 -c --compression-type zstd half.qcow2 out.qcow2" \
        "qemu-img convert -c -O qcow2 -o compression_type=zstd half.qcow2 out.qcow2"
    "$ours" convert -O qcow2 -c --compression-type zstd half.qcow2 ours.qcow2
    qemu-img convert -c -O qcow2 -o compression_type=zstd half.qcow2 theirs.qcow2
    size_row "  output size (zstd)" ours.qcow2 theirs.qcow2
    rm -f ours.qcow2 theirs.qcow2
fi
# add_incs DIR COUNT MIB STEP_MIB [SIZE]: appends COUNT INCs (virtual SIZE, default 4G) of MIB
# MiB of random data each (the i-th at i * STEP_MIB MiB), in qmpbackup's naming, linked to
# their predecessors (rebase -u) so that qemu-img can read the same chain.
add_incs() {
    local dir=$1 count=$2 mib=$3 step=$4 size=${5:-4G} prev=FULL-1700000000-disk.qcow2 i name
    for i in $(seq 1 "$count"); do
        truncate -s "$size" inc.raw
        dd if=/dev/urandom of=inc.raw bs=1M count="$mib" seek=$((i * step)) conv=notrunc status=none
        name=INC-$((1700000000 + i * 600))-disk.qcow2
        qemu-img convert -O qcow2 inc.raw "$dir/$name"
        qemu-img rebase -u -b "$prev" -F qcow2 "$dir/$name"
        prev=$name
        rm -f inc.raw
    done
}

# bench_merge LABEL DIR: merge of the chain in DIR against cp of its output and against
# qemu-img convert of its newest file (when qemu-img can convert it at all).
bench_merge() {
    local label=$1 dir=$2 top code=0
    top=$(ls "$dir" | sort | tail -n 1)
    "$ours" merge --force --dir "$dir" --targetfile ref.qcow2 2>/dev/null
    compare "merge $label vs cp" out.qcow2 \
        "$ours merge --force --dir $dir --targetfile out.qcow2" "cp ref.qcow2 out.qcow2" 2>/dev/null
    qemu-img convert -O qcow2 "$dir/$top" out.qcow2 2>/dev/null || code=$?
    if [ "$code" = 0 ]; then
        compare "merge $label vs qemu-img convert" out.qcow2 \
            "$ours merge --force --dir $dir --targetfile out.qcow2" \
            "qemu-img convert -O qcow2 $dir/$top out.qcow2" 2>/dev/null
    else
        printf '%-34s %s\n' "merge $label vs qemu-img convert" \
            "qemu-img convert fails on this chain (exit $code)"
    fi
    rm -f ref.qcow2 out.qcow2
}

# The 4-deep chain: the FULL above plus 4 INCs of 128 MiB each.
need_chain4() {
    if [ ! -d chain4 ]; then
        mkdir -p chain4
        cp img.qcow2 chain4/FULL-1700000000-disk.qcow2
        add_incs chain4 4 128 700
    fi
}

if [ -z "$filter" ] || [[ merge == *$filter* ]]; then
    need_chain4
    bench_merge 4-deep chain4
fi
if [ -z "$filter" ] || [[ merge30 == *$filter* ]]; then
    # A 30-deep chain: a 256 MiB FULL and 30 INCs of 16 MiB each (4 GiB virtual).
    if [ ! -d chain30 ]; then
        mkdir -p chain30
        truncate -s 4G full.raw
        dd if=/dev/urandom of=full.raw bs=1M count=256 seek=100 conv=notrunc status=none
        qemu-img convert -O qcow2 full.raw chain30/FULL-1700000000-disk.qcow2
        rm -f full.raw
        add_incs chain30 30 16 120
    fi
    bench_merge 30-deep chain30
fi
# start_qemu / stop_qemu: a prelaunch QEMU with img.qcow2 as its disk, QMP at qmp.sock.
start_qemu() {
    rm -f qmp.sock
    qemu-system-x86_64 -S -nodefaults -display none -machine q35 -accel kvm -accel tcg -m 128 \
        -qmp "unix:$work/qmp.sock,server=on,wait=off" \
        -blockdev "driver=qcow2,node-name=disk0,file.driver=file,file.filename=$work/img.qcow2" \
        -device virtio-blk-pci,drive=disk0,id=vd0 -daemonize -pidfile "$work/qemu.pid"
}
stop_qemu() { kill "$(cat qemu.pid)"; }

if [ -z "$filter" ] || [[ backup == *$filter* ]]; then
    # A full backup of the image above from a prelaunch QEMU (fleecing, job, manifest), against
    # cp of the same disk file.
    if command -v qemu-system-x86_64 >/dev/null; then
        start_qemu
        compare "backup full (${data_mib} MiB) vs cp" bk \
            "$backup --socket $work/qmp.sock backup -l full --uuid bench -t $work/bk" \
            "cp img.qcow2 bk" 2>/dev/null
        compare "  same, --blockdev-disable-cache" bk \
            "$backup --socket $work/qmp.sock backup -l full --blockdev-disable-cache --uuid bench -t $work/bk" \
            "cp img.qcow2 bk" 2>/dev/null
        stop_qemu
    else
        echo "backup: skipped (no qemu-system-x86_64; scripts/install-qemu-system installs it)"
    fi
fi
if [ -z "$filter" ] || [[ commit == *$filter* ]]; then
    # commit of the 4-deep chain into its FULL, against the original's sequence per INC:
    # qemu-img rebase -u onto the FULL, qemu-img commit, delete the INC. Each run works on a
    # fresh copy of the chain (copying is not timed).
    [ -d chain4 ] || { echo "commit: run the merge benchmark first (it builds chain4)"; exit 2; }
    cat > orig-commit.sh <<'SH'
#!/bin/sh
set -e
cd "$1"
full=$(ls FULL-* | head -n 1)
for inc in $(ls INC-* | sort); do
    qemu-img rebase -q -u -f qcow2 -F qcow2 -b "$full" "$inc"
    qemu-img commit -q -f qcow2 "$inc"
    rm -f "$inc"
done
SH
    chmod +x orig-commit.sh
    bench_commit() { # LABEL DIR
        bench_fold "commit $1 vs qemu-img sequence" "$2" "$ours commit --dir c" "$2" "./orig-commit.sh c"
    }
    bench_commit 4-deep chain4
    # The same FULL with 4 INCs that each rewrite the same 128 MiB (a hot region): the
    # original's sequence writes it 4 times, a fold once.
    if [ ! -d chain4hot ]; then
        mkdir -p chain4hot
        cp chain4/FULL-1700000000-disk.qcow2 chain4hot/
        add_incs chain4hot 4 128 0
    fi
    bench_commit "4-deep, hot region" chain4hot
fi
if [ -z "$filter" ] || [[ encrypted == *$filter* ]]; then
    # LUKS (aes-256-xts, QEMU's default): the 1 GiB-data FULL and 4 INCs of 128 MiB written
    # by qemu-io, once encrypted and once in plaintext, the same way. Merge of the encrypted
    # chain against merge of the plaintext one (what encryption costs us), and convert -O raw
    # of the encrypted FULL against qemu-img's.
    printf 'correct horse' > bench.key
    secret="secret,id=s,file=$work/bench.key"
    for kind in plain luks; do
        [ -d "enc-$kind" ] && continue
        d=enc-$kind.tmp; mkdir -p "$d"
        obj=(); o=""; opts=""
        if [ "$kind" = luks ]; then
            obj=(--object "$secret"); o="encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=100,"
        fi
        qemu-img convert "${obj[@]}" -O qcow2 ${o:+-o "${o%,}"} img.qcow2 "$d/FULL-1700000000-disk.qcow2"
        prev=FULL-1700000000-disk.qcow2
        for i in 1 2 3 4; do
            name=INC-$((1700000000 + i * 600))-disk.qcow2
            qemu-img create -q -f qcow2 "${obj[@]}" -o "${o}backing_file=$prev,backing_fmt=qcow2" "$d/$name"
            if [ "$kind" = luks ]; then
                opts="driver=qcow2,file.filename=$d/$name,encrypt.key-secret=s"
                for j in $(seq "$i"); do opts="$opts,$(printf 'backing.%.0s' $(seq "$j"))encrypt.key-secret=s"; done
                qemu-io "${obj[@]}" --image-opts "$opts" -c "write -P $i $((i * 700))M 128M" >/dev/null
            else
                qemu-io -f qcow2 "$d/$name" -c "write -P $i $((i * 700))M 128M" >/dev/null
            fi
            prev=$name
        done
        mv "$d" "enc-$kind"
    done
    compare "merge 4-deep LUKS vs plaintext" out.qcow2 \
        "$ours --key-file bench.key merge --dir enc-luks --targetfile out.qcow2" \
        "$ours merge --dir enc-plain --targetfile out.qcow2"
    compare "convert -O raw of LUKS (1 GiB)" out.raw \
        "$ours --key-file bench.key convert -O raw enc-luks/FULL-1700000000-disk.qcow2 out.raw" \
        "qemu-img convert --object $secret --image-opts driver=qcow2,file.filename=enc-luks/FULL-1700000000-disk.qcow2,encrypt.key-secret=s -O raw out.raw"
fi
if [ -z "$filter" ] || [[ prune == *$filter* ]]; then
    # prune --keep-last 2 of a 6-point chain (512 MiB FULL, 5 INCs of 64 MiB that overwrite
    # the FULL's data, so the fold writes in place), with a manifest per file, against
    # commit --until doing the same folding. Then commit with and without manifests: what
    # keeping them exact costs (the journal, each touched MiB proven before its first write
    # and checksummed after). Each run works on a fresh copy (not timed).
    if [ ! -d chain6 ]; then
        mkdir -p chain6
        truncate -s 1G full.raw
        dd if=/dev/urandom of=full.raw bs=1M count=512 conv=notrunc status=none
        qemu-img convert -O qcow2 full.raw chain6/FULL-1700000000-disk.qcow2
        rm -f full.raw
        add_incs chain6 5 64 80 1G
        python3 - chain6 <<'PY'
import json, os, sys, zlib
d = sys.argv[1]
names = sorted(n for n in os.listdir(d) if not n.startswith("."))
names.sort(key=lambda n: (not n.startswith("FULL"), n))
os.makedirs(f"{d}/.manifest", exist_ok=True)
for i, n in enumerate(names):
    crcs = []
    with open(f"{d}/{n}", "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            crcs.append("%08x" % zlib.crc32(b))
    m = dict(manifest_version=2, tool="bench", file=n, level="full" if i == 0 else "inc",
             epoch=int(n.split("-")[1]), uuid="bench", bitmap=None, device="disk", node="disk",
             qdev=None, source_file="disk.qcow2", qemu_version="10", format="qcow2",
             virtual_size=1 << 30, cluster_size=65536, parent=names[i - 1] if i else None,
             file_size=os.path.getsize(f"{d}/{n}"), extent_size=1 << 20, crc32s="".join(crcs))
    with open(f"{d}/.manifest/{n}.json", "w") as f:
        json.dump(m, f)
PY
        mkdir -p chain6-bare
        cp chain6/*.qcow2 chain6-bare/
    fi
    bench_fold "prune --keep-last 2 vs commit" chain6 "$ours prune --dir c --keep-last 2" \
        chain6 "$ours commit --dir c --until INC-1700002400"
    bench_fold "commit: manifests kept vs none" chain6 "$ours commit --dir c --until INC-1700002400" \
        chain6-bare "$ours commit --dir c --until INC-1700002400"
fi
if [ -z "$filter" ] || [[ verify == *$filter* ]]; then
    # verify of the 4-deep chain (every stored cluster read, every file checked) against cat
    # of the same files, both from the page cache after a warm-up; ratio < 1.25 meets
    # "verify >= 0.8x cat's throughput".
    [ -d chain4 ] || { echo "verify: run the merge benchmark first (it builds chain4)"; exit 2; }
    printf '#!/bin/sh\ncat chain4/* >/dev/null\n' > cat-chain4.sh
    chmod +x cat-chain4.sh
    compare "verify 4-deep vs cat" none "$ours verify --dir chain4" ./cat-chain4.sh
    # verify of a FULL backup (1 GiB of data) that qmpbackup made, through its manifest's
    # checksums (one per MiB), against cat of the file.
    if [ ! -d bkv ] && command -v qemu-system-x86_64 >/dev/null; then
        start_qemu
        "$backup" --socket "$work/qmp.sock" backup -l full --uuid bench -t "$work/bkv" >/dev/null
        stop_qemu
    fi
    if [ -d bkv ]; then
        printf '#!/bin/sh\ncat bkv/*/FULL-* >/dev/null\n' > cat-bkv.sh
        chmod +x cat-bkv.sh
        compare "verify FULL with manifest vs cat" none "$ours verify --recursive --dir bkv" ./cat-bkv.sh
    else
        echo "verify with manifest: skipped (no qemu-system-x86_64; scripts/install-qemu-system installs it)"
    fi
fi
if [ -z "$filter" ] || [[ serve == *$filter* ]]; then
    # nbdcopy of the whole restore point of the 4-deep chain to a raw file, served by us vs by qemu-nbd
    # (read-only, persistent, multi-connection) serving the chain's newest file; each timing
    # includes the server's start, and RSS is the larger of server and nbdcopy. Then the same
    # copy against `qmprestore merge --format raw` of the chain.
    if command -v nbdcopy >/dev/null && command -v qemu-nbd >/dev/null; then
        need_chain4
        top=$(ls chain4 | sort | tail -n 1)
        cat > nbd-copy.sh <<'SH'
#!/bin/sh
# nbd-copy.sh SOCKET OUT SERVER...: starts SERVER (listening on SOCKET), copies its default
# export to OUT with nbdcopy, stops the server.
sock=$1 out=$2; shift 2
rm -f "$sock"
"$@" 2>/dev/null &
pid=$!
while [ ! -S "$sock" ]; do sleep 0.005; done
nbdcopy "nbd+unix:///?socket=$sock" "$out"
kill "$pid"; wait "$pid" || true
SH
        chmod +x nbd-copy.sh
        compare "serve: nbdcopy 4-deep vs qemu-nbd" out.raw \
            "./nbd-copy.sh $work/nbd.sock out.raw $ours serve --dir chain4 --socket $work/nbd.sock" \
            "./nbd-copy.sh $work/nbd.sock out.raw qemu-nbd -r -t -e 0 -f qcow2 -k $work/nbd.sock chain4/$top"
        compare "serve: nbdcopy 4-deep vs merge raw" out.raw \
            "./nbd-copy.sh $work/nbd.sock out.raw $ours serve --dir chain4 --socket $work/nbd.sock" \
            "$ours merge --force --format raw --dir chain4 --targetfile out.raw" 2>/dev/null
        # The servers alone: nbdcopy to null: (nothing written, so the copy's cost is the
        # server's and the client's reading).
        compare "serve: nbdcopy 4-deep to null:" none \
            "./nbd-copy.sh $work/nbd.sock null: $ours serve --dir chain4 --socket $work/nbd.sock" \
            "./nbd-copy.sh $work/nbd.sock null: qemu-nbd -r -t -e 0 -f qcow2 -k $work/nbd.sock chain4/$top"
        # The first read from a 1000-file chain (64 GiB virtual, 64 KiB of data in every 50th
        # INC: opening the files is what costs), timed from the server's start; the reference
        # is the same read from qemu-nbd.
        # Every layer is a file descriptor in both servers.
        ulimit -n "$(ulimit -Hn)"
        if [ ! -f chain1000.done ]; then
            rm -rf chain1000
            mkdir -p chain1000
            qemu-img create -q -f qcow2 chain1000/FULL-1700000000-disk.qcow2 64G
            prev=FULL-1700000000-disk.qcow2
            for i in $(seq 1 999); do
                name=INC-$((1700000000 + i * 600))-disk.qcow2
                if [ $((i % 50)) = 0 ]; then
                    # Written alone, then linked: nothing opens the deep chain.
                    qemu-img create -q -f qcow2 "chain1000/$name" 64G
                    qemu-io -f qcow2 -c "write -P $((i % 250 + 1)) $((i * 64))M 64k" "chain1000/$name" >/dev/null
                    qemu-img rebase -u -b "$prev" -F qcow2 "chain1000/$name"
                else
                    qemu-img create -q -f qcow2 -u -b "$prev" -F qcow2 "chain1000/$name" 64G
                fi
                prev=$name
            done
            touch chain1000.done
        fi
        top=$(ls chain1000/*.qcow2 | sort | tail -n 1)
        cat > first-read.sh <<'SH'
#!/bin/sh
# first-read.sh SOCKET SERVER...: starts SERVER and retries a 64 KiB read until it succeeds.
sock=$1; shift
rm -f "$sock"
"$@" 2>/dev/null &
pid=$!
until qemu-io -r -f raw -c "read 0 64k" "nbd+unix:///?socket=$sock" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || { echo "first-read.sh: the server exited" >&2; exit 1; }
done
kill "$pid"; wait "$pid" || true
SH
        chmod +x first-read.sh
        compare "serve: first read, 1000-file chain" none \
            "./first-read.sh $work/nbd.sock $ours serve --dir chain1000 --socket $work/nbd.sock" \
            "./first-read.sh $work/nbd.sock qemu-nbd -r -t -e 0 -f qcow2 -k $work/nbd.sock $top"
    else
        echo "serve: skipped (needs nbdcopy and qemu-nbd: scripts/install-nbd-tools, qemu-utils)"
    fi
fi
# deep_chain DIR DEPTH SIZE_GIB EVERY PIECES PIECE_KIB: a chain of DEPTH files of SIZE_GIB GiB
# in qmpbackup's naming; every EVERY-th file (the FULL included) holds PIECES pieces of
# PIECE_KIB KiB of random data spread evenly over the disk (each file's a little further into
# its stretch than the one before, so they overlap partly). Data files are written alone and
# then linked, so that making the chain never opens it deep; the rest are empty overlays.
deep_chain() {
    local dir=$1 depth=$2 gib=$3 every=$4 pieces=$5 kib=$6
    [ -f "$dir.done" ] && return
    rm -rf "$dir"; mkdir -p "$dir"
    python3 - "$dir" "$depth" "$gib" "$every" "$pieces" "$kib" <<'PY'
import os, subprocess, sys
d, depth, gib, every, pieces, kib = sys.argv[1], *map(int, sys.argv[2:])
name = lambda i: "FULL-1700000000-disk.qcow2" if i == 0 else f"INC-{1700000000 + i * 600}-disk.qcow2"
stretch = (gib << 30) // pieces
with open("piece.bin", "wb") as f:
    f.write(os.urandom(kib << 10))
prev = None
for i in range(depth):
    f = f"{d}/{name(i)}"
    if i % every == 0:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", f, f"{gib}G"], check=True)
        shift = ((i // every) * (kib << 9)) % max(stretch - (kib << 10), 1) // 65536 * 65536
        cmds = []
        for k in range(pieces):
            cmds += ["-c", f"write -s piece.bin {k * stretch + shift} {kib}k"]
        for at in range(0, len(cmds), 400):
            subprocess.run(["qemu-io", "-f", "qcow2", *cmds[at:at + 400], f], check=True,
                           stdout=subprocess.DEVNULL)
        if prev:
            subprocess.run(["qemu-img", "rebase", "-u", "-b", prev, "-F", "qcow2", f], check=True)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", prev, "-F",
                        "qcow2", f, f"{gib}G"], check=True)
    prev = name(i)
os.remove("piece.bin")
PY
    touch "$dir.done"
}

if [ -z "$filter" ] || [[ scale == *$filter* ]]; then
    # Cost with the data, not the virtual size or the depth. Every file is a descriptor.
    ulimit -n "$(ulimit -Hn)"
    # One 4 TiB file holding 64 MiB (16 MiB at 0, 1, 2 TiB and at the end).
    if [ ! -f sparse4t.qcow2 ]; then
        qemu-img create -q -f qcow2 sparse4t.qcow2 4T
        qemu-io -c "write -P 1 0 16M" -c "write -P 2 1T 16M" -c "write -P 3 2T 16M" \
            -c "write -P 4 4095G 16M" sparse4t.qcow2 >/dev/null
    fi
    compare "sparse 4 TiB: convert -O qcow2" out.qcow2 \
        "$ours convert -O qcow2 sparse4t.qcow2 out.qcow2" \
        "qemu-img convert -O qcow2 sparse4t.qcow2 out.qcow2"
    compare "sparse 4 TiB: convert -O raw" out.raw \
        "$ours convert -O raw sparse4t.qcow2 out.raw" \
        "qemu-img convert -O raw sparse4t.qcow2 out.raw"
    compare "sparse 4 TiB: compare" none \
        "$ours compare sparse4t.qcow2 sparse4t.qcow2" \
        "qemu-img compare sparse4t.qcow2 sparse4t.qcow2"
    # 4 TiB, 4 files: each 4 pieces of 8 MiB, one per TiB (128 MiB in all).
    deep_chain chain4t 4 4096 1 4 8192
    bench_merge "4 TiB 4-file" chain4t
    # 200 files of a 1 TiB disk, each 32 pieces of 256 KiB spread over it (1.6 GiB stored,
    # 820 MiB visible).
    deep_chain chain200r 200 1024 1 32 256
    bench_merge "200-deep 1 TiB" chain200r
    # 1000 files of a 64 GiB disk; every 10th holds 32 pieces of 512 KiB (1.6 GiB stored,
    # 820 MiB visible).
    deep_chain chain1000r 1000 64 10 32 512
    bench_merge "1000-deep 64 GiB" chain1000r
    # The worst case for metadata: every 10th file holds one 64 KiB cluster in every 512 MiB,
    # so each L2 table read (64 KiB) yields 64 KiB of data, most of it overwritten above.
    deep_chain chain1000w 1000 64 10 128 64
    bench_merge "1000-deep, 1 cluster per L2 table" chain1000w
fi
if [[ -n "$filter" && s3 == *$filter* ]]; then
    # Restore and verify straight from an object store (a local one-node Garage cluster)
    # against the usual way: rclone copy of the chain to local disk, then a local merge; and
    # rclone check --download of the same objects. Not in the default run: it needs garage
    # (scripts/install-garage) and rclone (scripts/install-rclone).
    need_chain4
    garage=$(command -v garage || echo "$HOME/.cargo/bin/garage")
    [ -x "$garage" ] && command -v rclone >/dev/null || { echo "s3: needs garage and rclone"; exit 2; }
    repo=$(cd "$(dirname "$ours")/../.." && pwd)
    rm -rf garage
    GARAGE=$garage sh "$repo/tests/scripts/garage-cluster.sh" start "$work/garage" 1 23900 >/dev/null
    trap 'sh "$repo/tests/scripts/garage-cluster.sh" stop "$work/garage"; [ -n "${BENCH_DIR:-}" ] || rm -rf "$work"' EXIT
    for v in $(env | awk -F= '/^AWS_/ {print $1}'); do unset "$v"; done
    set -a; . "$work/garage/env"; set +a
    export RCLONE_CONFIG_G_TYPE=s3 RCLONE_CONFIG_G_PROVIDER=Other RCLONE_CONFIG_G_ENDPOINT=$AWS_ENDPOINT_URL \
        RCLONE_CONFIG_G_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID RCLONE_CONFIG_G_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY \
        RCLONE_CONFIG_G_REGION=$AWS_REGION RCLONE_CONFIG_G_FORCE_PATH_STYLE=true
    rclone copy --transfers 8 chain4 "g:$BUCKET/chain4"
    printf '#!/bin/sh\nset -e\nrm -rf dl\nrclone copy --transfers 8 g:%s/chain4 dl\n%s merge --force --dir dl --targetfile out.qcow2 2>/dev/null\nrm -rf dl\n' \
        "$BUCKET" "$ours" > rclone-merge.sh
    chmod +x rclone-merge.sh
    compare "merge 4-deep from s3 vs rclone+merge" out.qcow2 \
        "$ours merge --force --dir s3://$BUCKET/chain4 --targetfile out.qcow2" ./rclone-merge.sh
    printf '#!/bin/sh\nrclone check --download chain4 g:%s/chain4 2>/dev/null\n' "$BUCKET" > rclone-check.sh
    chmod +x rclone-check.sh
    compare "verify 4-deep from s3 vs rclone check" none \
        "$ours verify --dir s3://$BUCKET/chain4" ./rclone-check.sh
    # The shapes restores from a store must be fast on (issue #29), each against rclone copy
    # --transfers 32 of the folder + a local merge. Below the table: the requests one run of
    # ours made (its --debug summary) and the store's CPU time for one run of each.
    store_cpu() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$(cat "$work/garage/node1/pid")/stat"; }
    requests() { # LABEL OURS_COMMAND THEIR_COMMAND
        local a b c line
        a=$(store_cpu)
        line=$($2 2>&1 >/dev/null | grep -o 's3://[^ ]*: [0-9]* GET.*' | tail -n 1)
        b=$(store_cpu)
        $3 >/dev/null 2>&1
        c=$(store_cpu)
        awk -v l="$1" -v r="${line#*: }" -v a="$a" -v b="$b" -v c="$c" 'BEGIN {
            printf "  %-32s %s; store CPU %.2f s (theirs %.2f s)\n", l, r, b - a, c - b }'
    }
    s3_shape() { # LABEL DIR
        local label=$1 dir=$2
        rclone copy --transfers 32 "$dir" "g:$BUCKET/$dir" 2>/dev/null
        printf '#!/bin/sh\nset -e\nrm -rf dl\nrclone copy --transfers 32 g:%s/%s dl 2>/dev/null\n%s merge --force --dir dl --targetfile out.qcow2 2>/dev/null\nrm -rf dl\n' \
            "$BUCKET" "$dir" "$ours" > "rclone-$dir.sh"
        chmod +x "rclone-$dir.sh"
        compare "$label" out.qcow2 \
            "$ours merge --force --dir s3://$BUCKET/$dir --targetfile out.qcow2" "./rclone-$dir.sh" 2>/dev/null
        rows+=("$label|$ours --debug merge --force --dir s3://$BUCKET/$dir --targetfile out.qcow2|./rclone-$dir.sh")
    }
    rows=()
    # A FULL and 1050 INCs of a 1 MiB disk (hourly backups for six weeks), each INC one
    # 64 KiB cluster: latency-bound, one small object after another.
    if [ ! -d deep1050 ]; then
        python3 - deep1050 1050 <<'PY2'
import os, subprocess, sys
d, depth = sys.argv[1], int(sys.argv[2])
os.makedirs(d + ".tmp", exist_ok=True)
name = lambda i: "FULL-1700000000-disk.qcow2" if i == 0 else f"INC-{1700000000 + i * 3600}-disk.qcow2"
for i in range(depth + 1):
    f = f"{d}.tmp/{name(i)}"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", f, "1M"], check=True)
    pattern = "-s /dev/urandom 0 1M" if i == 0 else f"-P {i % 251 + 1} {(i * 7 % 16) * 65536} 64k"
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write {pattern}", f], check=True,
                   stdout=subprocess.DEVNULL)
    if i:
        # Unsafe rebase: qemu-io on a 1000-deep chain would open the whole chain each time.
        subprocess.run(["qemu-img", "rebase", "-u", "-b", name(i - 1), "-F", "qcow2", f], check=True)
os.rename(d + ".tmp", d)
PY2
    fi
    s3_shape "merge 1051-deep from s3 (1 MiB)" deep1050
    # serve of the same chain, read whole by nbdcopy, against the same rclone copy + merge.
    if command -v nbdcopy >/dev/null; then
        cat > serve-deep.sh <<EOF2
#!/bin/sh
rm -f nbd.sock out.raw
$ours \${DEBUG:+--debug} serve --dir s3://$BUCKET/deep1050 --socket nbd.sock 2>\${ERR:-/dev/null} &
pid=\$!
i=0; while [ ! -S nbd.sock ] && [ \$i -lt 2000 ]; do sleep 0.005; i=\$((i + 1)); done
nbdcopy "nbd+unix:///?socket=\$PWD/nbd.sock" out.raw
kill \$pid; wait \$pid
EOF2
        chmod +x serve-deep.sh
        compare "serve 1051-deep from s3 + nbdcopy" out.raw ./serve-deep.sh ./rclone-deep1050.sh 2>/dev/null
    fi
    # 1 GiB FULL + 4 x 128 MiB INCs of data that compresses about 1.7x (16 symbols a byte):
    # Garage stores its blocks zstd-compressed, so the store's CPU is the bound.
    if [ ! -d comp4 ]; then
        python3 - comp4 <<'PY2'
import os, subprocess, sys
d = sys.argv[1]
os.makedirs(d + ".tmp", exist_ok=True)
table = bytes(97 + (b & 15) for b in range(256))
def image(name, at, n):
    with open("shape.raw", "wb") as f:
        f.truncate(4 << 30)
        f.seek(at)
        for _ in range(n >> 20):
            f.write(os.urandom(1 << 20).translate(table))
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", "shape.raw", f"{d}.tmp/{name}"], check=True)
    os.remove("shape.raw")
image("FULL-1700000000-disk.qcow2", 0, 1 << 30)
prev = "FULL-1700000000-disk.qcow2"
for i in range(1, 5):
    name = f"INC-{1700000000 + i * 600}-disk.qcow2"
    image(name, i * (700 << 20), 128 << 20)
    subprocess.run(["qemu-img", "rebase", "-u", "-b", prev, "-F", "qcow2", f"{d}.tmp/{name}"], check=True)
    prev = name
os.rename(d + ".tmp", d)
PY2
    fi
    s3_shape "merge 4-deep compressible from s3" comp4
    # 512 MiB FULL + 4 x 64 MiB INCs of random data.
    if [ ! -d rand4 ]; then
        mkdir -p rand4.tmp
        truncate -s 4G full.raw
        dd if=/dev/urandom of=full.raw bs=1M count=512 conv=notrunc status=none
        qemu-img convert -O qcow2 full.raw rand4.tmp/FULL-1700000000-disk.qcow2
        rm -f full.raw
        add_incs rand4.tmp 4 64 600
        mv rand4.tmp rand4
    fi
    s3_shape "merge 4-deep random from s3" rand4
    echo "requests of one run (ours), and the store's CPU for one run of each:"
    for r in "${rows[@]}"; do
        IFS='|' read -r label cmd theirs <<<"$r"
        requests "$label" "$cmd" "$theirs"
    done
    if command -v nbdcopy >/dev/null; then
        requests "serve 1051-deep from s3" "env DEBUG=1 ERR=/dev/stderr ./serve-deep.sh" ./rclone-deep1050.sh
    fi
fi
