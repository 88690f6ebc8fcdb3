#!/usr/bin/env bash
# Rebuilds vendor/candle-core: candle-core 0.11.1 as published on crates.io (checksum checked),
# without its tests, benches and examples, with vendor/candle-core.patch applied. See
# vendor/README.md for what the patch changes and why.
#
#   bash scripts/vendor-candle-core.sh          # rewrite vendor/candle-core
#   bash scripts/vendor-candle-core.sh --check  # fail unless vendor/candle-core is exactly that
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VERSION=0.11.1
SHA256=d11c8be87cfbaef9ebb62fb3f850d1fc8e00cc1d11d393fdbe55a4d5c2cdb325
CRATE="candle-core-$VERSION.crate"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# cargo's download cache if it has the file, else crates.io.
cached="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$CRATE" 2>/dev/null | head -n 1 || true)"
if [[ -n "$cached" ]]; then
    cp "$cached" "$TMP/$CRATE"
else
    curl -sSfL -o "$TMP/$CRATE" "https://static.crates.io/crates/candle-core/$CRATE"
fi
echo "$SHA256  $TMP/$CRATE" | sha256sum -c --quiet -

tar -xzf "$TMP/$CRATE" -C "$TMP"
tree="$TMP/candle-core-$VERSION"
rm -rf "$tree"/{tests,benches,examples,Cargo.lock,Cargo.toml.orig,.cargo_vcs_info.json,.cargo-ok}
patch -s -p1 -d "$tree" < "$ROOT/vendor/candle-core.patch"
find "$tree" -name '*.orig' -delete

if [[ "${1:-}" == "--check" ]]; then
    if diff -r "$tree" "$ROOT/vendor/candle-core" > "$TMP/diff"; then
        echo "vendor/candle-core: candle-core $VERSION from crates.io with vendor/candle-core.patch"
    else
        head -n 40 "$TMP/diff" >&2
        echo "vendor/candle-core differs from candle-core $VERSION + vendor/candle-core.patch" >&2
        exit 1
    fi
else
    rm -rf "$ROOT/vendor/candle-core"
    cp -r "$tree" "$ROOT/vendor/candle-core"
    echo "wrote vendor/candle-core"
fi
