#!/usr/bin/env bash
# Fetch the pinned real aerial datasets listed in models/data/real_sources.yaml into data/sources/<name>.
#
#   bash scripts/fetch-real-data.sh [SOURCES_YAML] [DEST]
#
# Each source is a public GitHub repository at a pinned commit; only its data folder is checked out
# (partial clone + sparse checkout). Needs git and network access to github.com; run once, then
#   snipserve data import --sources models/data/real_sources.yaml --root data/sources --out data/real
#
# Without network, point SNIPSERVE_DATA_MIRROR at a folder of bare git directories named
# <owner>+<name>/repo (a read-only snapshot): files are then copied out of the pinned commit, and blobs the
# snapshot lacks are listed (the importer reports their labels as "label without image").
# The data is never committed and never fetched at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
sources=${1:-models/data/real_sources.yaml}
dest=${2:-data/sources}
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$dest"
"$py" - "$sources" <<'PY' | while IFS=$'\t' read -r name repo commit root; do
import sys, yaml
for s in yaml.safe_load(open(sys.argv[1]))["sources"]:
    print("\t".join([s["name"], s["repository"], s["commit"], s.get("root", ".")]))
PY
  out="$dest/$name"
  echo "== $name: $repo @ $commit ($root)"
  if [ -n "${SNIPSERVE_DATA_MIRROR:-}" ]; then
    gitdir="$SNIPSERVE_DATA_MIRROR/${repo/\//+}/repo"
    rm -rf "$out"; mkdir -p "$out"
    spec=(); [ "$root" != "." ] && spec=(-- "$root")
    missing=0
    while read -r _mode type sha path; do
      [ "$type" = blob ] || continue
      if git --git-dir="$gitdir" cat-file -e "$sha" 2>/dev/null; then
        mkdir -p "$out/$(dirname "$path")"
        git --git-dir="$gitdir" cat-file blob "$sha" >"$out/$path"
      else
        echo "   not in the snapshot: $path"; missing=$((missing + 1))
      fi
    done < <(git --git-dir="$gitdir" ls-tree -r "$commit" "${spec[@]}")
    echo "   $missing file(s) missing from the snapshot"
  else
    if [ ! -d "$out/.git" ]; then
      git clone --quiet --filter=blob:none --no-checkout "https://github.com/$repo.git" "$out"
    fi
    if [ "$root" != "." ]; then git -C "$out" sparse-checkout set "$root"; fi
    git -C "$out" -c advice.detachedHead=false checkout --quiet "$commit"
    echo "   checked out $(git -C "$out" rev-parse HEAD)"
  fi
done
