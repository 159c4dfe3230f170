#!/usr/bin/env bash
# Install the package with its test extras and the browser of the App test, check style, run the whole test suite,
# then run the numerics tests (export checks, parity) again under a second instruction set, so that a tolerance tuned
# on one CPU fails here rather than on a user's machine. With UAS_ACCEPTANCE=1 (set by .ci/run after the main job)
# the acceptance tests then run on the main job's outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
ruff check .
ruff format --check .
# Two workers: the tests that use a FiftyOne database run one after another on one (tests/conftest.py), the other
# modules share the other; most tests wait on subprocesses, so one process alone keeps about one core busy.
python -m pytest -q -n 2 --dist loadgroup --ignore=tests/test_acceptance.py "$@"
# The acceptance tests edit the checkout's params.yaml as a user does, and the suite's tests read that file: they run
# after the suite, alone.
if [[ "${UAS_ACCEPTANCE:-}" == 1 ]]; then
  python -m pytest -q tests/test_acceptance.py
fi
# The second instruction set: AVX2 on an AVX-512 CPU, the generic kernels on an AVX2-only one.
if grep -qw avx512f /proc/cpuinfo; then isa=avx2 onednn=AVX2; else isa=default onednn=SSE41; fi
echo "Numerics tests again under ATEN_CPU_CAPABILITY=$isa ONEDNN_MAX_CPU_ISA=$onednn"
ATEN_CPU_CAPABILITY=$isa ONEDNN_MAX_CPU_ISA=$onednn python -m pytest -q -n 2 --dist loadfile -p no:cacheprovider \
  -k "not serves_the_eager_model" \
  tests/test_graph_check.py tests/test_metauas_parity.py tests/test_inctrl_parity.py tests/test_faprompt_parity.py \
  tests/test_nearest_patch.py
