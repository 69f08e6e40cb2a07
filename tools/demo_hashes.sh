#!/usr/bin/env bash
# Hash every file `ossconv demo --out DIR` writes. Run it before and after a change that must not change
# behaviour, into the same DIR (paths are recorded in some outputs), and diff the two lists.
set -euo pipefail
dir=${1:?usage: tools/demo_hashes.sh DIR}
rm -rf "$dir"
ossconv demo --out "$dir" --quiet
cd "$dir" && find . -type f | sort | xargs sha256sum
