#!/usr/bin/env bash
# Issue 12, round 3 (2026-12-05, session 6): the dev grid of selection candidates on the CUDA engine, then
# the heldout split for the dev winner only (chosen by scripts/gpu_pick_best.py: best mean dev score).
# Usage on the device machine, after scripts/gpu_check.sh built lserve:
#   bash scripts/gpu_retrieval_round3.sh dev       # 84 dev cases per candidate -> build/round3/dev
#   bash scripts/gpu_retrieval_round3.sh heldout   # dense and the dev winner at budgets 1024 and 4096
set -uo pipefail
cd "$(dirname "$0")/.."
phase=$1
P=$(cd /tmp && python3 -c "import lserve.patterns, os; print(os.path.dirname(lserve.patterns.__file__))")/smollm2-135m-instruct.tsv
S='"prefill_local_tokens":1024,"decode_token_budget":1024,"head_pattern":"'$P'","group_score":"max","logical_page_size":4'
specs=(
  "center_l4={$S,\"page_score\":\"center\"}"
  "blend25_l4={$S,\"page_score\":\"blend\",\"page_score_spread\":0.25}"
  "blend12_l4={$S,\"page_score\":\"blend\",\"page_score_spread\":0.125}"
  "blend50_l4={$S,\"page_score\":\"blend\",\"page_score_spread\":0.5}"
  "center_l4_p32={$S,\"page_score\":\"center\",\"physical_page_size\":32}"
  "center_l4_p16={$S,\"page_score\":\"center\",\"physical_page_size\":16}"
  "blend25_l4_p16={$S,\"page_score\":\"blend\",\"page_score_spread\":0.25,\"physical_page_size\":16}"
  "center_l4_r1={$S,\"page_score\":\"center\",\"selection_reuse_interval\":1}"
  "abl_center_l4_sf25={$S,\"page_score\":\"center\",\"streaming_fraction\":0.25}"
)
mkdir -p build/round3
if [ "$phase" = dev ]; then
  OUT=build/round3/dev bash scripts/gpu_retrieval.sh dev 1024,2048,4096,8192 3 "${specs[@]}"
else
  mapfile -t chosen < <(python3 scripts/gpu_pick_best.py build/round3/dev "${specs[@]}" --budget 4096)
  printf 'chosen: %s\n' "${chosen[@]}"
  [ ${#chosen[@]} -eq 2 ] || exit 1
  OUT=build/round3/heldout bash scripts/gpu_retrieval.sh heldout 1024,2048,4096,8192 3 dense=- "${chosen[@]}"
  OUT=build/round3/heldout8k bash scripts/gpu_retrieval.sh heldout 8192 9 dense=- "${chosen[1]}"
fi
