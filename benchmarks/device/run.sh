#!/usr/bin/env bash
# bpdl on a real GPU (issue 16): one prepared script for a fresh, offline GPU machine.
#
# Builds bpdl against the machine's torch (or installs the README's torch first), prints
# `bpdl info`, runs the CUDA tests, the whole suite, the segregated-dendrite and feedback-
# alignment benchmarks and the 60-epoch G17 reproduction (784-500-10) on the GPU, each stage under
# its own time budget, and collects logs, CSVs and the figure into at most 8 files under $OUT.
# Stages are independent: a failure or a cut budget is recorded in $OUT/summary.txt and the next
# stage runs. `--dry-run` prints the stages, budgets and exact commands and runs nothing.
#
#   OUT=/some/folder benchmarks/device/run.sh [--data-dir DIR] [--stages a,b] [--dry-run]
#
# See `--help` and benchmarks/RESULTS.md, section "GPU runs (issue 16): the device script".

# Deliberately no `set -e`: every stage is run and its exit status recorded.
set -u -o pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
ROOT="$(cd "$(dirname "$SELF")/../.." && pwd)"
PROG="benchmarks/device/run.sh"

ALL_STAGES=(build info cuda-tests tests segregated fa-steps fa-lc microcircuits reproduce)
declare -A DEFAULT_BUDGET=([build]=150 [info]=20 [cuda-tests]=60 [tests]=90 [segregated]=60
                           [fa-steps]=45 [fa-lc]=30 [microcircuits]=35)
declare -A DESCRIPTION=(
  [build]="build bpdl (and its CUDA kernels) against the machine's torch"
  [info]="nvidia-smi, bpdl info, the GPU as torch sees it"
  [cuda-tests]="the CUDA test matrix (pytest -m cuda)"
  [tests]="the whole test suite"
  [segregated]="segregated-dendrite benchmark (784-500-10, 784-500-100-10; spiking, rate)"
  [fa-steps]="feedback-alignment benchmark, training-step times (steps)"
  [fa-lc]="feedback-alignment benchmark, LocallyConnected2d kernels against the reference (lc)"
  [microcircuits]="microcircuit full dynamics, fused kernels against the reference (784-500-10)"
  [reproduce]="bpdl reproduce guerguiev2017 --layers 1 (60 epochs; resumable)"
)
NEEDS_MNIST=" segregated microcircuits reproduce "
declare -A OUTPUT_OF=([cuda-tests]=tests/cuda-tests.xml [tests]=tests/tests.xml
                      [segregated]=bench/segregated.csv [fa-steps]=bench/feedback_alignment_steps.csv
                      [fa-lc]=bench/locally_connected.csv [microcircuits]=bench/microcircuits.csv)
TORCH_SPEC=(torch==2.14.1 torchvision==0.29.1)
BUILD_TOOLS=(numpy "scikit-build-core>=0.10" "pybind11>=2.12" ninja)
KILL_GRACE=5       # seconds between the interrupt (SIGINT) at the budget and SIGKILL
RESERVE=15         # seconds of the total kept for the kill grace and the collection

usage() {
  cat <<EOF
usage: $PROG [--dry-run] [--data-dir DIR] [--out DIR] [--stages LIST] [-h|--help]

Runs on a GPU machine, in the repository root of a copy of the working tree:
  $(IFS=' '; echo "${ALL_STAGES[*]}")
each under a time budget (timeout; SIGINT at the budget, SIGKILL ${KILL_GRACE} s later), records
every stage's status, exit status and duration in \$OUT/summary.txt, and collects logs, CSVs and
the reproduction's report and figure into at most 8 files in \$OUT. Exit status: 0 when every
selected stage succeeded, 1 when one failed, was cut or skipped, 2 for bad usage.

options:
  --dry-run        print the stages, budgets and exact commands; run nothing
  --data-dir DIR   dataset root in torchvision's layout (MNIST/raw/*.gz); default: \$BPDL_DATA_DIR,
                   else .device-data in the repository root (the GPU machine cannot download)
  --out DIR        output folder (default: \$OUT, else runs/device; relative paths here and in
                   the variables below are taken from the repository root)
  --stages LIST    comma-separated subset of the stages, run in the order above
                   (default: \$BPDL_DEVICE_STAGES, else all)

environment:
  OUT                     output folder (at most 8 files come back from it)
  BPDL_DATA_DIR           dataset root when --data-dir is not given
  BPDL_DEVICE_STAGES      stages to run (as --stages)
  BPDL_DEVICE_PYTHON      interpreter (default: .device-venv/bin/python if present, else python3)
  BPDL_DEVICE             device for the benchmarks and the reproduction (default cuda)
  BPDL_DEVICE_WORK        scratch folder (default runs/device-work; keeps the resumable run)
  BPDL_DEVICE_TOTAL       total budget in seconds (default 540); the reproduction gets the rest
  BPDL_BUDGET_<STAGE>     one stage's budget in seconds, STAGE in upper case with '_' for '-'
                          (BUILD=150 INFO=20 CUDA_TESTS=60 TESTS=90 SEGREGATED=60 FA_STEPS=45
                          FA_LC=30 MICROCIRCUITS=35; REPRODUCE: default the rest of the total)
  BPDL_DEVICE_ARGS_<STAGE> extra arguments appended to a stage's command (word-split)
  BPDL_CUDA, BPDL_CUDA_ARCH  passed to the build (default BPDL_CUDA=ON when nvcc is found)
EOF
}

die_usage() {
  echo "$PROG: error: $1" >&2
  echo "usage: $PROG [--dry-run] [--data-dir DIR] [--out DIR] [--stages LIST] [-h|--help]" >&2
  echo "(see $PROG --help)" >&2
  exit 2
}

# ---- options -----------------------------------------------------------------------------------
DRY=0
INTERNAL=""
DATA_OPT=""
OUT_OPT=""
STAGES_OPT=""
while (($#)); do
  case "$1" in
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    --data-dir|--out|--stages|--internal-stage)
      (($# >= 2)) || die_usage "option '$1' needs a value"
      case "$1" in
        --data-dir) DATA_OPT="$2" ;;
        --out) OUT_OPT="$2" ;;
        --stages) STAGES_OPT="$2" ;;
        --internal-stage) INTERNAL="$2" ;;
      esac
      shift ;;
    --data-dir=*) DATA_OPT="${1#*=}" ;;
    --out=*) OUT_OPT="${1#*=}" ;;
    --stages=*) STAGES_OPT="${1#*=}" ;;
    -*) die_usage "unknown option '$1'" ;;
    *) die_usage "unexpected argument '$1' (this script takes options only)" ;;
  esac
  shift
done

cd "$ROOT" || exit 2

abspath() {  # absolute path of $1 (need not exist), relative paths taken from the repository root
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$ROOT/$1" ;;
  esac
}

if [[ -n "$DATA_OPT" ]]; then
  DATA="$(abspath "$DATA_OPT")"; DATA_FROM="--data-dir"
elif [[ -n "${BPDL_DATA_DIR:-}" ]]; then
  DATA="$(abspath "$BPDL_DATA_DIR")"; DATA_FROM="BPDL_DATA_DIR"
else
  DATA="$ROOT/.device-data"; DATA_FROM="default"
fi
OUT="$(abspath "${OUT_OPT:-${OUT:-runs/device}}")"
WORK="$(abspath "${BPDL_DEVICE_WORK:-runs/device-work}")"
DEV="${BPDL_DEVICE:-cuda}"
TOTAL="${BPDL_DEVICE_TOTAL:-540}"
[[ "$TOTAL" =~ ^[1-9][0-9]*$ ]] || die_usage "BPDL_DEVICE_TOTAL must be a positive whole number of seconds"

resolve_python() {
  if [[ -n "${BPDL_DEVICE_PYTHON:-}" ]]; then
    PY="$BPDL_DEVICE_PYTHON"
  elif [[ -x "$ROOT/.device-venv/bin/python" ]]; then
    PY="$ROOT/.device-venv/bin/python"
  else
    PY="python3"
  fi
}
resolve_python
CMAKE_DIR="build/device-cmake"  # only for the fallback build without pip / scikit-build-core
if [[ -f "$ROOT/$CMAKE_DIR/.bpdl-in-tree" ]]; then export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"; fi

STAGES_LIST="${STAGES_OPT:-${BPDL_DEVICE_STAGES:-}}"
SELECTED=()
if [[ -z "$STAGES_LIST" || "$STAGES_LIST" == "all" ]]; then
  SELECTED=("${ALL_STAGES[@]}")
else
  IFS=',' read -r -a _wanted <<<"$STAGES_LIST"
  for s in "${_wanted[@]}"; do
    [[ " ${ALL_STAGES[*]} " == *" $s "* ]] ||
      die_usage "unknown stage '$s' (stages: $(IFS=,; echo "${ALL_STAGES[*]}"))"
  done
  for s in "${ALL_STAGES[@]}"; do  # keep the script's order
    [[ ",$STAGES_LIST," == *",$s,"* ]] && SELECTED+=("$s")
  done
fi

budget_var() { local v="${1^^}"; echo "BPDL_BUDGET_${v//-/_}"; }
for s in "${ALL_STAGES[@]}"; do
  v="$(budget_var "$s")"
  if [[ -n "${!v:-}" ]]; then
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die_usage "$v must be a positive whole number of seconds"
  fi
done
budget_of() {  # the fixed budget of a stage (not the reproduction's "rest")
  local v; v="$(budget_var "$1")"
  echo "${!v:-${DEFAULT_BUDGET[$1]}}"
}
extra_args() {  # BPDL_DEVICE_ARGS_<STAGE>, word-split into EXTRA
  local v="${1^^}"; v="BPDL_DEVICE_ARGS_${v//-/_}"
  read -r -a EXTRA <<<"${!v:-}"
}

have_mnist() {
  local f
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    [[ -f "$DATA/MNIST/raw/$f.gz" || -f "$DATA/MNIST/raw/$f" ]] || return 1
  done
}

export BPDL_DATA_DIR="$DATA"
# the tests read the original files from BPDL_SHARED_DATA (tests/conftest.py)
if [[ -z "${BPDL_SHARED_DATA:-}" ]] && have_mnist; then export BPDL_SHARED_DATA="$DATA"; fi
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

ENV_RESET=(env --default-signal=INT)  # SIGINT may be ignored in a background job; un-ignore it
env --default-signal=INT true 2>/dev/null || ENV_RESET=(env)

# ---- commands ----------------------------------------------------------------------------------
quote() {  # the arguments as a shell command line (single quotes where needed)
  local out="" a q="'"
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then out+="$a "; else out+="'${a//$q/$q\\$q$q}' "; fi
  done
  printf '%s' "${out% }"
}
# In a dry run, print a command; otherwise print it into the stage's log and run it.
run_cmd() {
  if ((DRY)); then
    echo "    \$ $(quote "$@")"
    return 0
  fi
  echo "+ $(quote "$@")"
  "$@"
}
note() { if ((DRY)); then echo "    # $*"; else echo "# $*"; fi; }

PROBE='import importlib.util as u, shutil, sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
for m in ("numpy", "matplotlib", "nevergrad", "tqdm", "pytest", "scikit_build_core", "pybind11", "ninja", "cmake"):
    print(f"  module {m}:", "found" if u.find_spec(m) else "MISSING")
for t in ("cmake", "ninja", "nvcc", "gcc", "g++"):
    print(f"  program {t}:", shutil.which(t) or "MISSING")'

GPU_PROBE='import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("CUDA available:", torch.cuda.is_available(), "devices:", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs")'

CHECK='import importlib.util as u, bpdl; missing = [m for m in ("numpy", "matplotlib", "nevergrad", "tqdm", "pytest") if not u.find_spec(m)]; print("bpdl", bpdl.__version__, "from", bpdl.__file__, "- missing modules:", ", ".join(missing) or "none")'

find_nvcc() {  # echo the nvcc to use, if any
  local c
  if command -v nvcc >/dev/null 2>&1; then command -v nvcc; return 0; fi
  for c in "${CUDA_HOME:-}/bin/nvcc" "${CUDA_PATH:-}/bin/nvcc" /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
    [[ -x "$c" ]] && { echo "$c"; return 0; }
  done
  return 1
}

st_build() {
  local rc=0 nvcc
  if ((DRY)); then
    note "CUDA: nvcc from PATH, \$CUDA_HOME, /usr/local/cuda*; with one, BPDL_CUDA=\${BPDL_CUDA:-ON}, else AUTO"
    note "if $PY imports torch (the machine's torch; no network needed):"
    run_cmd "$PY" -c "<probe: versions, build tools, modules>"
    run_cmd env PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_INDEX=1 "$PY" -m pip install --no-build-isolation --no-deps -v .
    note "... or, where pip or scikit-build-core is missing but cmake and pybind11 are there: CMake directly,"
    note "the extension copied into python/bpdl/ and python/ put on PYTHONPATH for the later stages"
    run_cmd cmake -S . -B "$CMAKE_DIR" -DCMAKE_BUILD_TYPE=Release "-DPython_EXECUTABLE=$PY" -DBPDL_CUDA=ON
    run_cmd cmake --build "$CMAKE_DIR" --parallel
    run_cmd cp "$CMAKE_DIR/_C.<suffix>.so" python/bpdl/
    note "else (needs network): the README's torch in a fresh .device-venv, then bpdl"
    run_cmd "$PY" -m venv .device-venv
    run_cmd .device-venv/bin/python -m pip install "${TORCH_SPEC[@]}"
    run_cmd .device-venv/bin/python -m pip install "${BUILD_TOOLS[@]}"
    run_cmd .device-venv/bin/python -m pip install --no-build-isolation -v ".[test]"
    note "then, with the interpreter that was built into:"
    run_cmd "$PY" -c "$CHECK"
    return 0
  fi
  if nvcc="$(find_nvcc)"; then
    export PATH="$(dirname "$nvcc"):$PATH" CUDACXX="${CUDACXX:-$nvcc}" BPDL_CUDA="${BPDL_CUDA:-ON}"
    note "nvcc: $nvcc; BPDL_CUDA=$BPDL_CUDA"
  else
    export BPDL_CUDA="${BPDL_CUDA:-AUTO}"
    note "WARNING: no nvcc found: the CUDA kernels cannot be built (BPDL_CUDA=$BPDL_CUDA)"
  fi
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 4)}"
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    note "$PY imports torch: building bpdl against it"
    run_cmd "$PY" -c "$PROBE"
    if [[ -f "$CMAKE_DIR/.bpdl-in-tree" ]]; then  # an earlier fallback build: undo it
      rm -f "$CMAKE_DIR/.bpdl-in-tree" python/bpdl/_C*.so
    fi
    if ! "$PY" -c "import pip, scikit_build_core, pybind11" >/dev/null 2>&1 &&
        "$PY" -c "import pybind11" >/dev/null 2>&1 && command -v cmake >/dev/null 2>&1; then
      note "pip or scikit-build-core is missing: CMake directly, the extension into python/bpdl/"
      local pyexe; pyexe="$(command -v "$PY")"
      run_cmd cmake -S . -B "$CMAKE_DIR" -DCMAKE_BUILD_TYPE=Release "-DPython_EXECUTABLE=$pyexe" \
        "-DBPDL_CUDA=$BPDL_CUDA" || return $?
      run_cmd cmake --build "$CMAKE_DIR" --parallel "$CMAKE_BUILD_PARALLEL_LEVEL" || return $?
      local built=("$CMAKE_DIR"/_C*.so)
      [[ -f "${built[0]}" ]] || { note "no _C*.so in $CMAKE_DIR"; return 1; }
      run_cmd cp "${built[@]}" python/bpdl/ || return $?
      touch "$CMAKE_DIR/.bpdl-in-tree"
      export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
    else
      run_cmd env PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_INDEX=1 "$PY" -m pip install --no-build-isolation --no-deps -v . ||
        rc=$?
    fi
  else
    note "$PY cannot import torch: installing the README's torch into .device-venv (needs network)"
    run_cmd "$PY" -m venv .device-venv || return $?
    PY="$ROOT/.device-venv/bin/python"
    run_cmd "$PY" -m pip install "${TORCH_SPEC[@]}" || return $?
    run_cmd "$PY" -m pip install "${BUILD_TOOLS[@]}" || return $?
    run_cmd "$PY" -m pip install --no-build-isolation -v ".[test]" || rc=$?
  fi
  ((rc == 0)) || return "$rc"
  run_cmd "$PY" -c "$CHECK"
}

st_info() {
  local rc=0
  if ((DRY)) || command -v nvidia-smi >/dev/null 2>&1; then
    run_cmd nvidia-smi
  else
    note "no nvidia-smi on this machine"
  fi
  run_cmd "$PY" -m bpdl.cli info --data-dir "$DATA" || rc=$?
  if ((DRY)); then
    run_cmd "$PY" -c "<GPU probe: torch and CUDA versions, name, memory, capability of each device>"
  else
    run_cmd "$PY" -c "$GPU_PROBE" || { local r=$?; ((rc)) || rc=$r; }
  fi
  return "$rc"
}

st_cuda_tests() {
  extra_args cuda-tests
  run_cmd "$PY" -m pytest -m cuda -v -p no:cacheprovider --junitxml "$WORK/tests/cuda-tests.xml" "${EXTRA[@]}"
}

st_tests() {
  extra_args tests
  run_cmd "$PY" -m pytest -p no:cacheprovider --durations=15 --junitxml "$WORK/tests/tests.xml" "${EXTRA[@]}"
}

st_segregated() {
  extra_args segregated
  note "writes benchmarks/results/segregated.csv; the script copies it to $WORK/bench/ and restores the tracked file"
  run_cmd "$PY" benchmarks/segregated.py --device "$DEV" --data-dir "$DATA" "${EXTRA[@]}"
}

st_fa_steps() {
  extra_args fa-steps
  run_cmd "$PY" benchmarks/feedback_alignment.py steps --device "$DEV" --out "$WORK/bench" "${EXTRA[@]}"
}

st_fa_lc() {
  extra_args fa-lc
  run_cmd "$PY" benchmarks/feedback_alignment.py lc --device "$DEV" --out "$WORK/bench" "${EXTRA[@]}"
}

st_microcircuits() {
  extra_args microcircuits
  run_cmd "$PY" benchmarks/microcircuits.py --device "$DEV" --data-dir "$DATA" --out "$WORK/bench" \
    --lanes 1 10 32 256 "${EXTRA[@]}"
}

st_reproduce() {
  extra_args reproduce
  run_cmd "$PY" -m bpdl.cli reproduce guerguiev2017 --layers 1 --device "$DEV" --out "$WORK/reproduce" \
    --data-dir "$DATA" --offline --no-progress "${EXTRA[@]}"
}

run_stage_function() { local f="st_${1//-/_}"; "$f"; }

if [[ -n "$INTERNAL" ]]; then  # one stage, under the parent's timeout
  [[ " ${ALL_STAGES[*]} " == *" $INTERNAL "* ]] || die_usage "unknown stage '$INTERNAL'"
  run_stage_function "$INTERNAL"
  exit $?
fi

# ---- the plan ----------------------------------------------------------------------------------
fixed_sum=0
for s in "${SELECTED[@]}"; do
  [[ "$s" == reproduce ]] || fixed_sum=$((fixed_sum + $(budget_of "$s")))
done
REPRO_VAR="$(budget_var reproduce)"
REPRO_FIXED="${!REPRO_VAR:-}"
REPRO_MIN=$((TOTAL - fixed_sum - RESERVE))
budget_text() {
  if [[ "$1" != reproduce ]]; then
    echo "budget $(budget_of "$1") s"
  elif [[ -n "$REPRO_FIXED" ]]; then
    echo "budget $REPRO_FIXED s ($REPRO_VAR)"
  else
    echo "budget ${REPRO_MIN} s (the rest of the ${TOTAL} s total: more when earlier stages finish early)"
  fi
}

header() {
  echo "repository:  $ROOT"
  echo "OUT:         $OUT"
  echo "work folder: $WORK"
  if have_mnist; then
    echo "data dir:    $DATA ($DATA_FROM; MNIST found)"
  else
    echo "data dir:    $DATA ($DATA_FROM; MNIST NOT found: stages segregated and reproduce are skipped)"
  fi
  echo "python:      $PY"
  echo "device:      $DEV"
  echo "environment: BPDL_DATA_DIR=$BPDL_DATA_DIR BPDL_SHARED_DATA=${BPDL_SHARED_DATA:-}" \
       "PYTHONPATH=${PYTHONPATH:-}"
  echo "total budget ${TOTAL} s; each stage runs as: timeout -s INT -k $KILL_GRACE BUDGET" \
       "${ENV_RESET[*]} bash $PROG --internal-stage STAGE"
}

if ((DRY)); then
  echo "bpdl device script (issue 16): dry run, nothing is executed"
  header
  i=0
  for s in "${SELECTED[@]}"; do
    i=$((i + 1))
    echo "[$i/${#SELECTED[@]}] $s: $(budget_text "$s") - ${DESCRIPTION[$s]}"
    run_stage_function "$s"
  done
  echo "then: collect into $OUT: summary.txt device.log results.tar.gz reproduction.md" \
       "(or reproduction-partial.md) reproduction.json metrics.jsonl test_error.png"
  exit 0
fi

# ---- run ---------------------------------------------------------------------------------------
now_ms() { date +%s%3N; }
START_MS="$(now_ms)"
mkdir -p "$OUT" "$WORK/logs" "$WORK/bench" "$WORK/tests" || { echo "$PROG: cannot create $OUT or $WORK" >&2; exit 2; }
rm -f "$WORK"/logs/*.log
SUMMARY="$OUT/summary.txt"
{
  echo "bpdl device run (issue 16), $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname 2>/dev/null || echo '?')"
  header
  echo
  printf '%-11s %-10s %4s %9s %7s\n' stage status rc seconds budget
} >"$SUMMARY"
echo "bpdl device script (issue 16): stages ${SELECTED[*]}; summary in $SUMMARY"

FAILED=0
declare -A STATUS=()
i=0
for s in "${SELECTED[@]}"; do
  i=$((i + 1))
  log="$WORK/logs/$(printf '%02d' "$i")-$s.log"
  elapsed=$((($(now_ms) - START_MS) / 1000))
  if [[ "$s" == reproduce ]]; then
    budget="${REPRO_FIXED:-$((TOTAL - elapsed - RESERVE))}"
  else
    budget="$(budget_of "$s")"
  fi
  resolve_python
  [[ -n "${OUTPUT_OF[$s]:-}" ]] && rm -f "$WORK/${OUTPUT_OF[$s]}"  # no stale results
  t0="$(now_ms)"
  if [[ "$NEEDS_MNIST" == *" $s "* ]] && ! have_mnist; then
    status="skipped"; rc="-"
    echo "skipped: no MNIST in $DATA (copy MNIST/raw/*.gz there, or pass --data-dir)" >"$log"
  elif [[ "$s" == reproduce ]] && ((budget < 20)); then
    status="skipped"; rc="-"
    echo "skipped: only ${budget} s of the ${TOTAL} s total left" >"$log"
  else
    echo "[$i/${#SELECTED[@]}] $s (budget $budget s) ..."
    if [[ "$s" == segregated ]]; then
      seg_csv="$ROOT/benchmarks/results/segregated.csv"
      rm -f "$WORK/segregated.csv.orig"
      [[ -f "$seg_csv" ]] && cp -p "$seg_csv" "$WORK/segregated.csv.orig"
      touch "$WORK/.segregated.start"
    fi
    timeout -s INT -k "$KILL_GRACE" "$budget" "${ENV_RESET[@]}" \
      bash "$SELF" --internal-stage "$s" --data-dir "$DATA" --out "$OUT" </dev/null >"$log" 2>&1
    rc=$?
    case "$rc" in
      0) status="ok" ;;
      124|137) status="timed-out" ;;
      *) status="failed" ;;
    esac
    if [[ "$s" == segregated ]]; then  # keep the measured CSV, restore the tracked one
      if [[ -f "$seg_csv" && "$seg_csv" -nt "$WORK/.segregated.start" ]]; then
        cp "$seg_csv" "$WORK/bench/segregated.csv"
      fi
      [[ -f "$WORK/segregated.csv.orig" ]] && cp -p "$WORK/segregated.csv.orig" "$seg_csv"
    fi
  fi
  secs="$(awk -v a="$t0" -v b="$(now_ms)" 'BEGIN { printf "%.1f", (b - a) / 1000 }')"
  STATUS[$s]="$status"
  [[ "$status" == ok ]] || FAILED=1
  printf '%-11s %-10s %4s %9s %7s\n' "$s" "$status" "$rc" "$secs" "$budget" >>"$SUMMARY"
  echo "[$i/${#SELECTED[@]}] $s: $status (rc $rc, $secs s of $budget s)"
  tail -n 3 "$log" | sed 's/^/      | /' | cut -c1-200
done

# ---- collect (at most 8 files in $OUT) ---------------------------------------------------------
RUN="$WORK/reproduce"
rm -rf "$WORK/reproduce-partial"
REPRO_SELECTED=0
[[ " ${SELECTED[*]} " == *" reproduce "* ]] && REPRO_SELECTED=1
if ((REPRO_SELECTED)) && [[ -f "$RUN/metrics.jsonl" && ! -f "$RUN/reproduction.md" ]]; then
  # cut by its budget: a partial report and figure from the metrics so far (rerun to resume)
  "$PY" - "$RUN" "$WORK/reproduce-partial" >"$WORK/logs/partial-report.log" 2>&1 <<'EOF'
import sys
from pathlib import Path

from bpdl.experiments.segregated import PUBLISHED, plot_test_error, reproduction_markdown
from bpdl.runs import load_run

run, out = load_run(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
hidden = run["config"].get("model_options", {}).get("hidden", [500])
label = "-".join(str(n) for n in (784, *hidden, 10))
epochs = run["config"].get("epochs")
curve = [{"epoch": r["epoch"],
          "test_error": None if r.get("test_acc") is None else 100 * (1 - r["test_acc"]),
          "train_error_running": None if r.get("running_acc") is None else 100 * (1 - r["running_acc"])}
         for r in run["history"]]
done = max([r["epoch"] for r in run["history"]] + [(run["summary"] or {}).get("epochs") or 0])
record = {"network": label, "published_test_error": PUBLISHED.get(label), "curve": curve,
          "status": (run["summary"] or {}).get("status", "unfinished")
          + f" (PARTIAL: {done:.2f} of {epochs} epochs; the stage was cut by its time budget,"
            " rerun the script to resume)",
          "protocol": "G17 (see the full report once the run has finished)"}
(out / "reproduction.md").write_text(reproduction_markdown(record))
plot_test_error(record, out / "test_error")
print(f"partial report: {done:.2f} of {epochs} epochs")
EOF
fi
if ((REPRO_SELECTED)); then
  for f in reproduction.md reproduction.json metrics.jsonl; do
    [[ -f "$RUN/$f" ]] && cp "$RUN/$f" "$OUT/$f"
  done
  if [[ -f "$RUN/reproduction.md" && -f "$RUN/figures/test_error.png" ]]; then
    cp "$RUN/figures/test_error.png" "$OUT/test_error.png"
  elif [[ -f "$WORK/reproduce-partial/reproduction.md" ]]; then
    cp "$WORK/reproduce-partial/reproduction.md" "$OUT/reproduction-partial.md"
    [[ -f "$WORK/reproduce-partial/test_error.png" ]] &&
      cp "$WORK/reproduce-partial/test_error.png" "$OUT/test_error.png"
  fi
fi

# one combined log (each stage's log at most 1.5 MiB, its end kept)
{
  for log in "$WORK"/logs/*.log; do
    [[ -f "$log" ]] || continue
    echo "===== $(basename "$log" .log) ====="
    if (($(stat -c %s "$log") > 1572864)); then
      echo "[... cut: the last 1.5 MiB of $(stat -c %s "$log") bytes follow ...]"
      tail -c 1572864 "$log"
    else
      cat "$log"
    fi
    echo
  done
} >"$OUT/device.log"

# CSVs, JUnit reports and the resumable run folder (with its checkpoint) in one archive
items=()
for d in bench tests reproduce reproduce-partial; do [[ -e "$WORK/$d" ]] && items+=("$d"); done
if ((${#items[@]})); then
  tar -czf "$OUT/results.tar.gz" -C "$WORK" "${items[@]}" 2>>"$OUT/device.log"
  if (($(stat -c %s "$OUT/results.tar.gz") > 16000000)); then
    tar -czf "$OUT/results.tar.gz" -C "$WORK" --exclude='reproduce/checkpoints' "${items[@]}" 2>>"$OUT/device.log"
  fi
fi

# the targets of issue 16, from what was measured (stdlib only)
TPY="$(command -v python3 || echo "$PY")"
{
  echo
  echo "targets (issue 16):"
  "$TPY" - "$WORK" "$DEV" <<'EOF' 2>&1
import csv
import json
import os
import sys
import xml.etree.ElementTree as ET

work, dev = sys.argv[1], sys.argv[2]


def rows(name):
    path = os.path.join(work, "bench", name)
    if not os.path.exists(path):
        return None
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("device") == dev]


for label, name in (("CUDA tests", "cuda-tests.xml"), ("whole suite", "tests.xml")):
    try:
        root = ET.parse(os.path.join(work, "tests", name)).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        verdict = "met" if f == e == 0 and n > s else "NOT met"
        print(f"  {label}: {n - f - e - s} passed, {f} failed, {e} errors, {s} skipped "
              f"(all pass: {verdict})")
    except (OSError, ET.ParseError, AttributeError):
        print(f"  {label}: no JUnit report (stage not run or killed)")
seg = rows("segregated.csv")
hit = [r for r in seg or [] if r["network"] == "784-500-10" and r["mode"] == "spiking"]
if hit:
    ms = float(hit[0]["kernels_train_ms"])
    print(f"  segregated 784-500-10 spiking on {dev}, batch {hit[0]['batch']}: {ms:.4f} ms per "
          f"training example, {float(hit[0]['kernels_test_ms']):.4f} ms per test example "
          f"(<= 0.02 ms: {'met' if ms <= 0.02 else 'NOT met'})")
else:
    print(f"  segregated: no {dev} rows")
try:
    with open(os.path.join(work, "reproduce", "reproduction.json")) as f:
        rec = json.load(f)
    err, wall = rec.get("final_test_error_mean"), rec.get("wall_time_s")
    ok = rec.get("status") == "completed" and err is not None and err <= 4.1 and wall is not None \
        and wall <= 300
    print(f"  reproduction 784-500-10: status {rec.get('status')}, final test error "
          f"{'-' if err is None else f'{err:.2f}'} %, training wall time "
          f"{'-' if wall is None else f'{wall:.0f}'} s (<= 4.1 % in <= 300 s: "
          f"{'met' if ok else 'NOT met'})")
except (OSError, ValueError):
    print("  reproduction: no finished report (not run, or cut: see reproduction-partial.md)")
lc = rows("locally_connected.csv")
if lc:
    slow = [f"{r['layer']} {r['op']} x{r['speedup']}" for r in lc if float(r["speedup"]) < 1]
    print(f"  LocallyConnected2d kernels vs reference on {dev}: {len(lc) - len(slow)} of {len(lc)} "
          f"rows no slower (no slower: {'met' if not slow else 'NOT met: ' + '; '.join(slow)})")
else:
    print(f"  LocallyConnected2d: no {dev} rows")
mcs = rows("microcircuits.csv")
if mcs:
    print(f"  microcircuit full dynamics on {dev}, fused kernels: "
          + "; ".join(f"{r['lanes']} lanes {float(r['fused_us_per_example_step']):.2f} us per "
                      f"example-step (x{float(r['speedup_vs_reference']):.1f} vs reference)"
                      for r in mcs))
else:
    print(f"  microcircuits: no {dev} rows")
steps = rows("feedback_alignment_steps.csv")
if steps:
    worst = {}
    for r in steps:
        if r["rule"] != "bp":
            worst[r["model"]] = max(worst.get(r["model"], 0.0), float(r["ratio_to_bp"]))
    print(f"  feedback-alignment steps on {dev}, worst rule's step time / backprop's: "
          + "; ".join(f"{m} x{v:.2f}" for m, v in worst.items()))
else:
    print(f"  feedback-alignment steps: no {dev} rows")
EOF
  echo
  echo "last lines of each stage's log:"
  for log in "$WORK"/logs/[0-9]*.log; do
    [[ -f "$log" ]] || continue
    echo "  $(basename "$log" .log): $(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-160)"
  done
  echo
  echo "total wall time $((($(now_ms) - START_MS) / 1000)) s; files in OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
} >>"$SUMMARY"

echo
cat "$SUMMARY"
exit "$FAILED"
