#!/usr/bin/env bash
# Re-fetch the gallery's vendored <model-viewer> into assets/model-viewer/ and check it.
#
# The version is the one pinned in assets/model-viewer/package.json; `npm pack` fetches its tarball from the
# npm registry, whose sha512 must equal package-lock.json's "integrity", and the two files taken from it
# (dist/model-viewer-umd.min.js, LICENSE -> model-viewer.LICENSE) must match SHA256SUMS before they replace
# the vendored copies. After a deliberate upgrade (a new version in package.json): run
# `npm install --package-lock-only` there, then this script with --update to record the new sums.
#
#   tools/vendor-js.sh            # fetch, verify, install (fails, changing nothing, on any mismatch)
#   tools/vendor-js.sh --update   # fetch, verify the tarball, install and rewrite SHA256SUMS
set -euo pipefail
cd "$(dirname "$0")/../assets/model-viewer"
pkg=@google/model-viewer
version=$(node -p "require('./package.json').dependencies['$pkg']")
want=$(node -p "require('./package-lock.json').packages['node_modules/$pkg'].integrity")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tarball=$(cd "$tmp" && npm pack --silent "$pkg@$version")
got=sha512-$(node -e "process.stdout.write(require('crypto').createHash('sha512')
  .update(require('fs').readFileSync(process.argv[1])).digest('base64'))" "$tmp/$tarball")
if [[ "$got" != "$want" ]]; then
  echo "vendor-js: $pkg@$version tarball is $got, package-lock.json says $want" >&2
  exit 1
fi
tar -xzf "$tmp/$tarball" -C "$tmp" package/dist/model-viewer-umd.min.js package/LICENSE
mkdir "$tmp/out"
cp "$tmp/package/dist/model-viewer-umd.min.js" "$tmp/out/model-viewer-umd.min.js"
cp "$tmp/package/LICENSE" "$tmp/out/model-viewer.LICENSE"
if [[ "${1:-}" == "--update" ]]; then
  (cd "$tmp/out" && sha256sum model-viewer-umd.min.js model-viewer.LICENSE) > SHA256SUMS
else
  (cd "$tmp/out" && sha256sum --check --quiet "$OLDPWD/SHA256SUMS")
fi
cp "$tmp/out/model-viewer-umd.min.js" "$tmp/out/model-viewer.LICENSE" .
echo "vendor-js: $pkg@$version verified and installed in $(pwd)"
