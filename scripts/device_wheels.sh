#!/usr/bin/env bash
# Wheels the device machine lacks for scripts/device_check.sh (it has torch, numpy, pyarrow,
# typer, pyyaml ... but not Ray), downloaded here for its Python 3.12 and split in two, since a
# call carries 64 MiB at most and Ray's wheel alone is about 79 MB:
#   .whl-a/  the first half of Ray's wheel           (carried by the first call: `stage`)
#   .whl-b/  the second half and the other wheels    (carried by the second call: `run`)
# Both folders are git-ignored through .git/info/exclude.
set -euo pipefail
cd "$(dirname "$0")/.."
for d in .whl-a .whl-b; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
rm -rf .whl .whl-a .whl-b && mkdir -p .whl .whl-a .whl-b
PY=${PYTHON:-.venv/bin/python}
platforms=()
for n in 2_28 2_27 2_24 2_17; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# Ray's own needs that the device image lacks (its other needs are there: KINDS.md)
for pkg in "ray==2.60.0" "jsonschema==4.25.1" "jsonschema-specifications==2025.9.1" \
           "referencing==0.37.0" "rpds-py==0.28.0" "pydicom"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "$pkg"
done
ray=$(ls .whl/ray-*.whl)
split -n 2 -d "$ray" .whl-a/ray.part-
mv .whl-a/ray.part-01 .whl-b/
basename "$ray" > .whl-b/ray.name
find .whl -type f -name '*.whl' ! -name 'ray-*' -exec mv {} .whl-b/ \;
rm -rf .whl
du -sh .whl-a .whl-b
