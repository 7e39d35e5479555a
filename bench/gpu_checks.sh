#!/usr/bin/env bash
# The GPU measurements of bench/results/*_h200.txt, as run on the lent machine (one call).
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
run eval_world_ft_llm 75 bench/eval_cost.py --config configs/edit/ft_llm.yaml $W --accelerator gpu --cases 24
run eval_world_ike 75 bench/eval_cost.py --config configs/edit/ike.yaml $W --config configs/edit/world/ike_pool.yaml --accelerator gpu --cases 24
run eval_7b_ft_llm 130 bench/eval_cost.py --config configs/edit/ft_llm.yaml --config configs/bench/llava_7b_shaped.yaml --accelerator gpu --cases 8
run eval_7b_ike 120 bench/eval_cost.py --config configs/edit/ike.yaml --config configs/bench/ike_k2.yaml --config configs/bench/llava_7b_shaped.yaml --accelerator gpu --cases 8 --no-generation
run scaling_world_ike 100 bench/scaling.py --config configs/edit/ike.yaml $W --config configs/edit/world/ike_pool.yaml --accelerator gpu --cases 100 1000 10000 --widths 128 512 2048 --ks 1 3 10
