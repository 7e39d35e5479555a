#!/usr/bin/env bash
# The GPU measurements for bench/results/*_h200.txt, prepared for the lent machine (one call).
# Its image has torch but not jsonargparse and an older transformers: wheels come from .whl/
# (git-ignored; fill it first with `pip download --no-deps -d .whl transformers==5.24.0
# jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0 importlib_resources`
# and carry it). Outputs land in $OUT.
set -u
export PYTHONPATH=.  # the image has no editable install of the lab
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --root-user-action=ignore .whl/*.whl 2>&1 | tail -3
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
python3 -m world.build --config configs/world/demo.yaml --out data/world/demo > /dev/null
W="--config configs/edit/world/llava.yaml"
run() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" python3 "$@" 2>&1 | grep -v Warning | tee "$OUT/$name.txt" | tail -16; }
# About 9 minutes in all; the 7B-shaped runs are fp32 random weights (the naive loop deep-copies 28 GB).
run eval_world_ft_llm_h200 90 bench/eval_cost.py --config configs/edit/ft_llm.yaml $W --accelerator gpu --cases 24 --repeat 2
run eval_world_ft_vis_h200 90 bench/eval_cost.py --config configs/edit/ft_vis.yaml $W --accelerator gpu --cases 24 --repeat 2
run eval_world_ike_h200 90 bench/eval_cost.py --config configs/edit/ike.yaml $W --config configs/edit/world/ike_pool.yaml --accelerator gpu --cases 24 --repeat 2
run gpu_memory_7b_h200_bf16 120 bench/gpu_memory_7b.py
run eval_7b_ft_llm_h200 150 bench/eval_cost.py --config configs/edit/ft_llm.yaml --config configs/bench/llava_7b_shaped.yaml --accelerator gpu --cases 4
