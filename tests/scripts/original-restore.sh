#!/bin/sh
# The original qmprestore's three restore procedures (qmpbackup 0.67, libqmpbackup/image.py
# and lib.get_images), replayed as the qemu-img command sequences they run, so the tests can
# prove that backups taken by our qmpbackup restore with the original's tools.
#
#   original-restore.sh merge DIR TARGETFILE   copy the FULL, then fold INCs newest first
#                                              through copies next to TARGETFILE
#   original-restore.sh commit DIR             rebase -u each INC onto the FULL, commit, delete
#   original-restore.sh snapshotrebase DIR     the same, with an internal snapshot per INC
#
# DIR and TARGETFILE must be absolute, as the original made them. No --until, --filter or
# --skip-check: the default paths only.
set -eu
mode=$1
dir=$2
target=${3:-}
cd "$dir"

# get_images: every regular file except *.config and uuid, oldest mtime first; any partial
# file or a first file that is no FULL fails.
images=
for f in $(ls -A -t -r); do
    [ -f "$f" ] || continue
    case "$f" in *.config | uuid) continue ;; esac
    images="$images $dir/$f"
done
[ -n "$images" ] || { echo "No image files found in specified directory" >&2; exit 1; }
case "$images" in *.partial*) echo "Partial backup file found" >&2; exit 1 ;; esac
set -- $images
full=$1
case "$(basename "$full")" in FULL-*) ;; *) echo "Unable to find base FULL image" >&2; exit 1 ;; esac

case "$mode" in
merge)
    tdir=$(dirname "$target")
    [ ! -e "$target" ] || { echo "Target file [$target] already exists" >&2; exit 1; }
    cp "$full" "$target"
    # Newest to oldest: each INC is committed into a copy of its predecessor (the FULL's
    # copy being the target itself).
    n=$#
    while [ "$n" -gt 1 ]; do
        eval "image=\${$n}"
        prev_n=$((n - 1))
        if [ "$prev_n" -eq 1 ]; then prev=$target; else eval "prev=\${$prev_n}"; fi
        [ -e "$tdir/$(basename "$image")" ] || cp "$image" "$tdir/$(basename "$image")"
        [ -e "$tdir/$(basename "$prev")" ] || cp "$prev" "$tdir/$(basename "$prev")"
        qemu-img rebase -f qcow2 -F qcow2 -b "$tdir/$(basename "$prev")" "$tdir/$(basename "$image")" -u
        qemu-img commit -b "$tdir/$(basename "$prev")" "$tdir/$(basename "$image")"
        rm "$tdir/$(basename "$image")"
        n=$prev_n
    done
    ;;
commit | snapshotrebase)
    [ "$#" -gt 1 ] || { echo "No incremental images found, nothing to rebase." >&2; exit 1; }
    qemu-img check "$full" >/dev/null
    if [ "$mode" = snapshotrebase ] && ! qemu-img snapshot -l "$full" | grep -q FULL-BACKUP; then
        qemu-img snapshot -c FULL-BACKUP "$full"
    fi
    shift
    for image in "$@"; do
        qemu-img check "$image" >/dev/null
        qemu-img rebase -f qcow2 -F qcow2 -b "$full" "$image" -u
        if [ "$mode" = commit ]; then
            qemu-img commit "$image"
        else
            ts=$(basename "$image" | cut -d- -f2)
            qemu-img commit -b "$full" "$image"
            qemu-img snapshot -c "$(date -d "@$ts" +%Y-%m-%d-%H:%M:%S)" "$full"
        fi
        rm "$image"
    done
    ;;
*)
    echo "usage: $0 merge DIR TARGETFILE | commit DIR | snapshotrebase DIR" >&2
    exit 2
    ;;
esac
