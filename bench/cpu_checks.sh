#!/usr/bin/env bash
# The CPU measurements of bench/results/*_cpu.txt, in one sequential run on an otherwise idle
# machine (two benchmarks at once on 2 cores would time each other). About 25 minutes.
#   bash bench/cpu_checks.sh [OUT_DIR]      (default bench/results)
set -u
OUT=${1:-bench/results}; mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
W="--config configs/edit/world/llava.yaml"
POOL="--config configs/edit/world/ike_pool.yaml"
$PY -m world.build --config configs/world/demo.yaml --out data/world/demo > /dev/null
run() {
  local name=$1; shift
  echo "== $name"
  { echo "# $*"; echo "# $(nproc)-core CPU, $(date -u +%F), torch $($PY -c 'import torch; print(torch.__version__)')"
    # Without the per-run results tables and library chatter; the ratios and rates stay.
    $PY "$@" 2>&1 | grep -v -e Warning -e "^GPU available" -e "^TPU available" -e "Tip:" -e "Seed set" \
      -e "Loading weights" -e "LeafSpec" -e "LightningCLI's args" -e "^method .*Rel" -e "^-----" \
      -e "^(scores in" | grep -v -E "^(ft_llm|ft_vis|ike) +[0-9]"
  } > "$OUT/$name.txt"
  tail -12 "$OUT/$name.txt"
}
R="--cases 24 --repeat 3"
run eval_world_ft_llm_cpu bench/eval_cost.py --config configs/edit/ft_llm.yaml $W $R
run eval_world_ft_vis_cpu bench/eval_cost.py --config configs/edit/ft_vis.yaml $W $R
run eval_world_ike_cpu bench/eval_cost.py --config configs/edit/ike.yaml $W $POOL $R
run eval_world_ft_llm_nogen_cpu bench/eval_cost.py --config configs/edit/ft_llm.yaml $W $R --no-generation
run eval_world_ike_nogen_cpu bench/eval_cost.py --config configs/edit/ike.yaml $W $POOL $R --no-generation
run eval_deep_ft_llm_nogen_cpu bench/eval_cost.py --config configs/edit/ft_llm.yaml --config configs/bench/llava_deep_cpu.yaml --cases 8 --no-generation
run edit_cost_world_ft_cpu bench/edit_cost.py --methods ft_llm ft_vis --cases 24 $W
run edit_cost_world_ike_cpu bench/edit_cost.py --methods ike --cases 24 $W $POOL
run scaling_world_ft_llm_cpu bench/scaling.py --config configs/edit/ft_llm.yaml $W --cases 100 1000 --widths 32 64 128 256 --ks 1 3 10
run scaling_world_ike_cpu bench/scaling.py --config configs/edit/ike.yaml $W $POOL --cases 100 1000 10000 --widths 32 64 128 256 --ks 1 3 10
