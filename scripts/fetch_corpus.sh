#!/usr/bin/env bash
# Builds data/wordnet.txt: the WordNet 3.0 glosses from Debian's dict-wn
# package (about 31 MB of English text), the real-text corpus of the
# defaults study in bench/RESULTS.md. Needs apt access to a Debian mirror;
# nothing is installed (the package is downloaded and unpacked only).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/data/wordnet.txt"
if [[ -s "$out" ]]; then echo "$out exists"; exit 0; fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download dict-wn >/dev/null)
dpkg-deb -x "$tmp"/dict-wn_*.deb "$tmp/x"
mkdir -p "$root/data"
zcat "$tmp/x/usr/share/dictd/wn.dict.dz" > "$out.tmp"
mv "$out.tmp" "$out"
echo "$out: $(stat -c %s "$out") bytes"
