#!/usr/bin/env bash
# Refresh the chart library the dashboard ships (simvue/server/ui/static/vendor/uplot) from the
# npm registry: uPlot, MIT licensed.  The version and checksums are pinned; a mismatch stops.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=1.6.32
dest=simvue/server/ui/static/vendor/uplot
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "uplot@$VERSION" >/dev/null && tar xzf "uplot-$VERSION.tgz")
cp "$work/package/dist/uPlot.iife.min.js" "$work/package/dist/uPlot.min.css" "$work/package/LICENSE" "$dest/"
echo "$VERSION" > "$dest/VERSION"
(cd "$dest" && sha256sum -c <<'SUMS'
8f989229699b4fe2f1a0432d0e9edc338a8a911e250e2d1b01ecd770a5f5b1bd  LICENSE
19c8d4c6ad88929a79f4ae49d6f7161566dfd0ba3d15cc495e974f787eb78f1f  uPlot.iife.min.js
df630c6a8d6f8eeaff264b50f73ce5b114f646ffd9a0bb74f049b0a00135fa04  uPlot.min.css
SUMS
)
