#!/usr/bin/env bash
# The device kit: on one GPU, the self-test and then the device benchmark (bf16 step time and
# peak memory of CR-Net, lowrank and dense at the LLaMA 1B and 7B layer shapes, seq 4096), each
# written to OUT as JSON and a Markdown table. Needs no network: megatron-core comes from .whl/
# (tools/fetch_device_wheels.sh, run where pip works) when the image lacks it, installed into a
# temporary target; the package runs from this checkout.
#
#   tools/device_kit.sh OUT          # on the GPU machine (about 5 minutes on one H200): every
#                                    # self-test check, the distributed optimizer's save/resume
#                                    # (torch Adam without Apex/TE) and Algorithm 1 in bf16 with
#                                    # its conditioning guard included
#   tools/device_kit.sh OUT --cpu    # tiny shapes and the fast checks (the test suite runs this)
set -uo pipefail
out=${1:?usage: tools/device_kit.sh OUT [--cpu]}
mode=${2:-}
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out"
py=${PYTHON:-python3}
if ! "$py" -c "import megatron.core" 2>/dev/null; then
  if ! ls .whl/megatron_core-*.whl >/dev/null 2>&1; then
    echo "device_kit: megatron-core is not installed and .whl/ holds no wheel; run" \
         "tools/fetch_device_wheels.sh where pip works and carry .whl" >&2
    exit 2
  fi
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/crnet_site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/crnet_site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
checks=() reduced=()
if [ "$mode" = "--cpu" ]; then
  checks=(--checks versions bf16_vs_fp32 export_round_trip gemm_nccl_sniff)
  reduced=(--reduced)
fi
status=0
"$py" -m crnet_megatron.cli.selftest "${checks[@]}" --workdir "${TMPDIR:-/tmp}/crnet_kit_$$" \
  --json "$out/selftest.json" --markdown "$out/selftest.md" > "$out/selftest.log" 2>&1 || status=1
cat "$out/selftest.md"
"$py" -m crnet_megatron.cli.bench device "${reduced[@]}" --json "$out/device.json" \
  > "$out/device.md" 2> "$out/device.log" || status=1
cat "$out/device.md"
exit $status
