#!/usr/bin/env bash
# A Hydra sweep: two scorers x three amounts, six jobs, run in parallel on this machine by
# the joblib launcher (hydra/launcher=local), each in its own folder under the sweep folder.
# When the last job ends, the sweep folder also holds sweep_summary.csv, sweep_summary.md
# and sweep_accuracy.png (accuracy against sparsity, one line per scorer).
#
#   bash examples/hydra_sweep.sh [sweep folder]
#   QUICK=1 bash examples/hydra_sweep.sh [sweep folder]   # small settings, 2 jobs (CI)
#
# The same sweep on a SLURM cluster: hydra/launcher=slurm instead of local (after
# pip install hydra-submitit-launcher), with e.g. hydra.launcher.partition=gpu.
set -euo pipefail

sweep_dir=${1:-multirun/hydra_sweep_example}
amounts=0.25,0.5,0.75
launcher=local
small=()
if [[ "${QUICK:-0}" == 1 ]]; then
  # Two tiny jobs start sooner one after the other in this process than in two new ones.
  amounts=0.5
  launcher=basic
  small=(experiment=quick)
fi

lightning-shapley -m hydra/launcher="$launcher" \
  pruning=shapley,l1 pruning.amount="$amounts" \
  "${small[@]}" hydra.sweep.dir="$sweep_dir"

# The summary table was printed above; the files:
ls "$sweep_dir"
