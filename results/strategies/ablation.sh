#!/bin/bash
# issue 13: which non-ideality costs each strategy what: evaluation-only runs of the strategies'
# trained networks (compensation none) with one non-ideality switched off at a time.
cd "$(dirname "$0")/../.."  # the repository root
: "${STORE:=sqlite:////tmp/s29/strat.db}"  # the store that holds the strategies sweep
export OMP_NUM_THREADS=1
PY=.venv/bin/python
# the sweep's runs with eval.compensation=none, by hardware, tile size and training (run ids in $STORE)
declare -A SRC
SRC[pcm64tech_aware]=cc702220575a4af2ba90db1941336286; SRC[pcm64noise_aware]=a2d290dabda34298b381a4714fb12caf; SRC[pcm64standard]=9991e0d72f8c4d89ae7adebc0a5c26bd
SRC[rram256tech_aware]=d774cad0ef5b43068cfa7455dc8dd261; SRC[rram256noise_aware]=657ce32e8ea849428c794c24507ea1a9; SRC[rram256standard]=0535b7007ef74398926565b16c615065
for hs in "pcm 64" "rram 256"; do
  set -- $hs; hw=$1; size=$2
  for tr in standard noise_aware tech_aware; do
    id=${SRC[$hw$size$tr]}
    for abl in "none" "nonideality.d2d=false nonideality.c2c=false" "nonideality.read_noise=false" "nonideality.r_source=false nonideality.r_sink=false" "nonideality.stuck=false"; do
      extra=$abl; [ "$abl" = none ] && extra=""
      label=$(echo "$abl" | sed -e 's/nonideality\.//g' -e 's/=false//g' -e 's/ /+/g')
      $PY run.py mode=evaluate source=$id model=fcn dataset=mnist5k nonideality=full hardware=$hw xbar.size=$size training=$tr \
        eval.n_chips=5 'eval.times=[86400.0,31536000.0]' eval.calibration_samples=256 eval.compensation=none $extra \
        "run_name=$tr off $label" logger.experiment_name=strategies_ablation logger.tracking_uri=$STORE \
        trainer.enable_progress_bar=false hydra.run.dir=outputs/ablation/$hw$size$tr$RANDOM > /tmp/ablation_last.log 2>&1
      echo "$hw $size $tr [$abl] rc=$? $(grep -o 'test/acc_xbar_mean=[0-9.]*' /tmp/ablation_last.log | head -1)"
    done
  done
done
echo done $(date)
