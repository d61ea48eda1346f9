#!/usr/bin/env bash
# Print the immutable image tag of this checkout: <version>-<commit>-<variant>,
# e.g. 0.1.0-3f2a9c1d0e4b-gpu-cu13 (version from pyproject.toml, 12 hex digits of the commit).
# A tag names one commit, so a tree with uncommitted or untracked changes is refused.
#   bash deploy/image-tag.sh cpu|gpu-cu13
set -euo pipefail
variant=${1:-}
case "$variant" in
    cpu|gpu-cu13) ;;
    *) echo "image-tag.sh: give the image variant, cpu or gpu-cu13 (got '$variant')" >&2; exit 2 ;;
esac
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
if [ -n "$(git -C "$root" status --porcelain)" ]; then
    echo "image-tag.sh: $root has uncommitted changes; commit them first (a tag must name one commit)" >&2
    exit 1
fi
version=$(sed -n 's/^version = "\([^"]*\)"$/\1/p' "$root/pyproject.toml")
[ -n "$version" ] || { echo "image-tag.sh: no version = \"...\" line in $root/pyproject.toml" >&2; exit 1; }
echo "$version-$(git -C "$root" rev-parse --short=12 HEAD)-$variant"
