#!/usr/bin/env bash
# Reruns every number of the README's "T-Patcher and UniKE" section on the world (evaluation split,
# the sweeps on validation) and regenerates docs/unike/table.{md,csv} and the plots:
#   bash docs/unike/rerun.sh            (about an hour on one thread of a 2-core CPU)
# Results go to results/unike_table (one folder per row), results/unike_seq and results/sweeps.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-.venv/bin/python}
out=results/unike_table/llava
world=(--config configs/edit/world/llava.yaml)
memory=(--config configs/edit/world/train_memory.yaml)
quiet=(--trainer.logger false --trainer.enable_progress_bar false)
"$py" -m world.build --config configs/world/demo.yaml --out data/world/demo
# The earlier methods, T-Patcher and UniKE (demo.py mines UniKE's knowledge first).
"$py" demo.py --methods ft_llm ft_vis ike mend ke serac tpatcher unike --out results/unike_table
for ablation in configs/edit/unike_ablations/*.yaml; do
  name=$(basename "$ablation" .yaml)
  echo "== unike ablation $name =="
  "$py" edit.py test --config configs/edit/unike.yaml "${world[@]}" "${memory[@]}" --config "$ablation" \
    "${quiet[@]}" --results_dir "$out/unike_$name"
done
"$py" report.py "$out" --out docs/unike
# Sequential K = 10, 20 and cross-task (5 E-VQA + 5 E-IC per sequence).
for method in tpatcher unike; do
  for k in 10 20; do
    echo "== $method sequential K=$k =="
    "$py" edit.py test --config "configs/edit/$method.yaml" "${world[@]}" "${memory[@]}" \
      --model.mode sequential --data.batch_size "$k" "${quiet[@]}" --results_dir "results/unike_seq/${method}_k$k"
  done
  echo "== $method cross-task =="
  "$py" edit.py test --config "configs/edit/$method.yaml" "${world[@]}" "${memory[@]}" \
    --config configs/edit/world/cross_task.yaml "${quiet[@]}" --results_dir "results/unike_seq/${method}_cross_task"
done
# alpha, beta, top-K: each value on validation, the best on evaluation.
for parameter in alpha beta top_k; do
  echo "== sweep $parameter =="
  "$py" sweep.py "configs/sweeps/unike_$parameter.yaml" --evaluate configs/edit/world/llava.yaml
done
