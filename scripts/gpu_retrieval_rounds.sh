#!/usr/bin/env bash
# Issue 12: the dev grid of selection candidates on the CUDA engine, then the heldout split for the dev
# winner only (chosen by scripts/gpu_pick_best.py: best mean dev score among the non-ablation candidates).
# Round 3 (2026-12-05, session 6): the blended score and smaller physical pages. Round 4 (session 7): on
# top of round 3's winner, a guaranteed recent window for the dense heads (select_recent_tokens) and
# per-head budgets from the head pattern's scores (head_budget_skew), same pages per step in all.
# Usage on the device machine, after scripts/gpu_check.sh built lserve:
#   bash scripts/gpu_retrieval_rounds.sh ROUND dev       # 84 dev cases per candidate -> build/roundR/dev
#   bash scripts/gpu_retrieval_rounds.sh ROUND heldout   # dense and the dev winner at budgets 1024 and 4096
#     (round 4: 9 cases per task and length, and round 3's winner beside a new pick)
# LSERVE_EVAL_JOBS=N runs N configs at once (scripts/gpu_retrieval.sh); the scores do not depend on it.
set -uo pipefail
cd "$(dirname "$0")/.."
round=$1 phase=$2
P=$(cd /tmp && python3 -c "import lserve.patterns, os; print(os.path.dirname(lserve.patterns.__file__))")/smollm2-135m-instruct.tsv
S='"prefill_local_tokens":1024,"decode_token_budget":1024,"head_pattern":"'$P'","group_score":"max","logical_page_size":4'
# Specs set head_budget_skew themselves: the preset's own (SmolLM2: 4, since round 4) must not
# creep into a candidate when the model file is named after SmolLM2.
case $round in
  3)
    S="$S,\"head_budget_skew\":0"
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
    ) ;;
  4)
    W="$S,\"page_score\":\"blend\",\"page_score_spread\":0.25,\"physical_page_size\":16"
    W0="$W,\"head_budget_skew\":0"
    specs=(
      "r3={$W0}"
      "rec64={$W0,\"select_recent_tokens\":64}"
      "rec128={$W0,\"select_recent_tokens\":128}"
      "skew1={$W,\"head_budget_skew\":1.0}"
      "skew2={$W,\"head_budget_skew\":2.0}"
      "skew4={$W,\"head_budget_skew\":4.0}"
      "skew2_rec64={$W,\"head_budget_skew\":2.0,\"select_recent_tokens\":64}"
      "abl_r3_budget2048={$W0,\"decode_token_budget\":2048}"
    ) ;;
  *) echo "unknown round $round (3 or 4)" >&2; exit 2 ;;
esac
dir=build/round$round
mkdir -p "$dir"
if [ "$phase" = dev ]; then
  OUT=$dir/dev bash scripts/gpu_retrieval.sh dev 1024,2048,4096,8192 3 "${specs[@]}"
else
  mapfile -t chosen < <(python3 scripts/gpu_pick_best.py "$dir/dev" "${specs[@]}" --budget 4096)
  printf 'chosen: %s\n' "${chosen[@]}"
  [ ${#chosen[@]} -eq 2 ] || exit 1
  if [ "$round" = 3 ]; then
    # The two calls run side by side (LSERVE_EVAL_JOBS configs at once within each).
    OUT=$dir/heldout bash scripts/gpu_retrieval.sh heldout 1024,2048,4096,8192 3 dense=- "${chosen[@]}" &
    OUT=$dir/heldout8k bash scripts/gpu_retrieval.sh heldout 8192 9 dense=- "${chosen[1]}" &
    wait
  else
    # Round 4 on: 9 cases per (task, length), 252 per config (the first 3 of each are round 3's 84), so
    # one case moves a config's score by 0.4 points instead of 1.2. Round 3's winner runs beside the
    # pick (at both budgets) when the pick is another config: before and after on the same cases.
    extra=()
    case "${chosen[0]}" in
      "${specs[0]}") ;;
      *) extra=("${specs[0]}")
         extra+=("$(python3 scripts/gpu_pick_best.py "$dir/dev" "${specs[0]}" --budget 4096 2>/dev/null | tail -1)") ;;
    esac
    # LSERVE_HELDOUT_SAMPLES (default 9) and LSERVE_HELDOUT_DENSE=0 (dense run elsewhere, same cases) are
    # for the CPU engine, where 252 cases per config take hours (docs/ACCURACY.md, round 4 on the CPU).
    dense=(dense=-)
    [ "${LSERVE_HELDOUT_DENSE:-1}" = 0 ] && dense=()
    OUT=$dir/heldout bash scripts/gpu_retrieval.sh heldout 1024,2048,4096,8192 "${LSERVE_HELDOUT_SAMPLES:-9}" \
      "${dense[@]}" "${chosen[@]}" "${extra[@]}"
  fi
fi
