#!/usr/bin/env bash
# The GPU check of issue 26 (scripts/device_check.py), in two calls of the device tool on one
# warm machine, after `bash scripts/device_wheels.sh` here:
#   run(command="bash scripts/device_check.sh stage", carry=[".whl-a"], timeout_s=120)
#   run(command="bash scripts/device_check.sh run", carry=[".whl-b"], timeout_s=540)
# `run` joins Ray's wheel, installs the wheels into /tmp/site, and runs the checks (about 6
# minutes on an H100: search in process at 64 / 1,024 / auto, the scorer's whole path, the Ray
# job with one and two actors on the GPU, FLOP/s against the matmul peak). Figures come back
# in $OUT/device_check.json; record them, with the card's name, in docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-run}" in
  stage)  # the first half of Ray's wheel waits in /tmp, outside the working tree
    mkdir -p /tmp/device-wheels && cp .whl-a/ray.part-00 /tmp/device-wheels/
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    ;;
  run)
    test -f /tmp/device-wheels/ray.part-00 || { echo "run 'stage' first on this machine"; exit 2; }
    name=$(cat .whl-b/ray.name)
    cat /tmp/device-wheels/ray.part-00 .whl-b/ray.part-01 > "/tmp/device-wheels/$name"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "/tmp/device-wheels/$name" .whl-b/*.whl
    export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
    python3 -c "import ray, torch; print('ray', ray.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))"
    out="${OUT:-/tmp/device-check}"
    timeout 480 python3 scripts/device_check.py --device cuda --rows 65536 --out "$out" \
      2>&1 | tee "$out/device_check.log"
    ;;
  *) echo "usage: $0 stage|run"; exit 2 ;;
esac
