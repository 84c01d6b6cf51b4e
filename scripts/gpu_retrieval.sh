#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu_check.sh has installed lserve: `lserve eval retrieval` of
# SmolLM2-135M-Instruct on the CUDA engine (bfloat16) under several sparsity configs, one JSON each.
# Sparse configs need LSERVE_EXPERIMENTAL_CUDA_SPARSITY=1 (set here): the CUDA sparse path runs its
# attention on the reference kernel (issue 17), which the device suite checks against the CPU.
#
# Usage, from the repository root:
#   bash scripts/gpu_retrieval.sh SPLIT LENGTHS SAMPLES NAME=ARGS [NAME=ARGS ...]
#     NAME=dense runs the dense engine; any other NAME runs sparsity "lserve" with ARGS, a JSON object of
#     SparsityConfig overrides ('{}' for the preset).
#   e.g. bash scripts/gpu_retrieval.sh dev 1024,2048,4096,8192 5 dense=- \
#          'center_max={"prefill_local_tokens":1024,"decode_token_budget":1024,"page_score":"center","group_score":"max"}'
# The model: $LSERVE_GGUF, else build/smol/model.gguf, assembled from build/smol/part* if absent (the
# GGUF, 98 MB, is larger than one transfer to the device machine: split -b 50000000 it into build/smol/
# and carry one part per call).
# LSERVE_EVAL_TASKS (comma-separated) limits the tasks; LSERVE_EVAL_DEVICE=cpu tries the script here.
# Output: $OUT (or /tmp/lserve_gpu_retrieval)/retrieval_SPLIT_NAME.json, and one summary line per config.
set -uo pipefail
cd "$(dirname "$0")/.."
split=$1 lengths=$2 samples=$3
shift 3
out=${OUT:-/tmp/lserve_gpu_retrieval}
mkdir -p "$out"
model=${LSERVE_GGUF:-build/smol/model.gguf}
if [ ! -f "$model" ]; then
  cat build/smol/part* > "$model.$$" && mv "$model.$$" "$model" || exit 1  # two calls may race here
fi
echo "model $(sha256sum "$model")"
export LSERVE_EXPERIMENTAL_CUDA_SPARSITY=1 PYTHONUNBUFFERED=1
# LSERVE_EVAL_JOBS=N (default 1) runs up to N configs at once, one process each (the model is small:
# each process holds its weights and one sequence's KV cache, max_num_seqs 1); each config's cases
# run as they would alone, so the scores do not depend on N.
run_one() {
  local spec=$1 name args start rc
  name=${spec%%=*} args=${spec#*=}
  start=$(date +%s)
  local config
  if [ "$name" = dense ]; then
    config=(--sparsity dense)
  else
    config=(--sparsity lserve --sparsity-args "$args")
  fi
  [ -n "${LSERVE_EVAL_TASKS:-}" ] && config+=(--tasks "$LSERVE_EVAL_TASKS")
  python3 -c "import sys; from lserve.cli import main; sys.exit(main(sys.argv[1:]))" eval retrieval \
    --model "$model" --device "${LSERVE_EVAL_DEVICE:-cuda}" --split "$split" --lengths "$lengths" --samples "$samples" \
    "${config[@]}" --quiet \
    --out "$out/retrieval_${split}_${name}.json" >"$out/retrieval_${split}_${name}.log" 2>&1
  rc=$?
  python3 - "$out/retrieval_${split}_${name}.json" "$name" "$rc" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
path, name, rc, seconds = sys.argv[1:]
try:
    report = json.load(open(path))
except (OSError, ValueError) as error:
    sys.exit(f"{name}: no results (rc {rc}, {seconds}s): {error}")
for config, total in report["totals"].items():
    by_length = report["accuracy"][config]["all"]
    lengths = " ".join(f"{length}:{score:.3f}" for length, score in by_length.items() if length != "all")
    print(f"{name}: score {total['score']:.4f} over {total['num_cases']} cases ({lengths}; rc {rc}, {seconds}s)")
PY
}
# LSERVE_EVAL_SHARED=1 runs the sparse configs in one process instead (lserve eval retrieval
# --variants): those that differ only in decode-time settings share one engine, each prompt is
# prefilled once for all of them (Engine.set_decode_sparsity and the prefix cache; CPU engine only),
# and the replies are those of one engine per config. Its JSON is then split into the per-config
# files the other scripts read. Dense configs run as above. Only the CPU engine shares (with
# LSERVE_EVAL_DEVICE=cpu); on CUDA the one process runs the configs one engine each.
run_shared() {
  local start rc
  start=$(date +%s)
  python3 - "$out/variants_${split}.json" "$@" <<'PY' || return 1
import json, sys
path, *specs = sys.argv[1:]
json.dump({spec.split("=", 1)[0]: json.loads(spec.split("=", 1)[1] or "{}") for spec in specs}, open(path, "w"))
PY
  local names config=()
  names=$(printf '%s\n' "$@" | sed 's/=.*//' | paste -sd, -)
  [ -n "${LSERVE_EVAL_TASKS:-}" ] && config+=(--tasks "$LSERVE_EVAL_TASKS")
  python3 -c "import sys; from lserve.cli import main; sys.exit(main(sys.argv[1:]))" eval retrieval \
    --model "$model" --device "${LSERVE_EVAL_DEVICE:-cuda}" --split "$split" --lengths "$lengths" --samples "$samples" \
    --sparsity "$names" --variants "@$out/variants_${split}.json" "${config[@]}" --quiet \
    --out "$out/retrieval_${split}_shared.json" >"$out/retrieval_${split}_shared.log" 2>&1
  rc=$?
  python3 - "$out" "$split" "$rc" "$(( $(date +%s) - start ))" <<'PY'
import json, os, sys
from lserve.eval.retrieval import summarize, write_results
out, split, rc, seconds = sys.argv[1:]
try:
    report = json.load(open(os.path.join(out, f"retrieval_{split}_shared.json")))
except (OSError, ValueError) as error:
    sys.exit(f"shared: no results (rc {rc}, {seconds}s): {error}")
for name in report["configs"]:
    rows = [r for r in report["results"] if r["config"] == name]
    if not rows:
        continue
    one = {**report, "configs": [name], "sparsity_args": report["variants"].get(name, {}), "variants": {},
           "results": rows, **summarize(rows)}
    write_results(os.path.join(out, f"retrieval_{split}_{name}.json"), one)
    total = one["totals"][name]
    lengths = " ".join(f"{k}:{v:.3f}" for k, v in one["accuracy"][name]["all"].items() if k != "all")
    print(f"{name}: score {total['score']:.4f} over {total['num_cases']} cases ({lengths}; shared, rc {rc}, {seconds}s)")
PY
}
jobs_max=${LSERVE_EVAL_JOBS:-1}
shared=()
for spec in "$@"; do
  if [ "${LSERVE_EVAL_SHARED:-0}" = 1 ] && [ "${spec%%=*}" != dense ]; then
    shared+=("$spec")
    continue
  fi
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n; done
  run_one "$spec" &
done
if [ ${#shared[@]} -gt 0 ]; then
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n; done
  run_shared "${shared[@]}" &
fi
wait
