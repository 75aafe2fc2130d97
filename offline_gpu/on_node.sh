#!/usr/bin/env bash
# Runs the pipeline on a GPU node without internet, from the root of a copy of
# the project that carries a kit built by `python -m offline_gpu.kit`
# (GPU_KIT, default .gpu):
#
#   IMAGEPIPE_SOURCE_COMMIT=<commit> offline_gpu/on_node.sh PART...   (OUT: where results go)
#
# IMAGEPIPE_SOURCE_COMMIT names the commit the copy was made from (the runs'
# MLflow tags and run.json record it; the copy may have no .git of its own).
# First the kit's wheels are installed into GPU_SITE (default /tmp/site; kept
# for later runs on the same node, as is GPU_WORK, default /tmp/offline_gpu,
# where the parts keep what a later run reads) and the kit's settings written into the
# copy's params.yaml (the mirror's CIFAR-10 copy, cifar10_jpeg, and any --set
# of the kit), so that the stages and dvc commit read the same params.
#
# Parts, in the order given (each writes its results as soon as it ends, so a
# run stopped by a time limit still leaves what finished):
#   restore  on a node that ran an earlier commit part, what that left (dvc.lock and
#            the small outputs), for a copy of the project sent anew with the old ones
#   data     download, prepare and corrupt what the kit's experiments read
#            (from the kit's mirror); needed once per node before the rest
#   fast     cifar10_fast alone on the GPU (train + evaluate), if the kit has it:
#            its train seconds are a target, so nothing shares the GPU with it
#   runs     every other experiment of the kit at its full settings, side by side
#            on the one GPU (python -m offline_gpu.runs), stopped at RUNS_DEADLINE_S
#            seconds (a stopped train resumes from its checkpoint next time)
#   commit   dvc commit of the train@ and evaluate@ stages that finished (DVC runs
#            with core.no_scm: the copy's git, if any, is not the source's),
#            then dvc status; brings back dvc.lock and the status
#   report   the report stage and its dvc commit, when every experiment's model is here
#   cost     FLOPs and bytes of a train step, counted from the layers and by XLA
#   bench    ours against the seed's plain Keras script, mnist_cae and cifar10_cnn,
#            all images, seed batch sizes (throughput, epoch, memory, ratio)
#   options  mnist_cae at batch 256, ours only: as in params.yaml, then one option
#            at a time: data on the device, steps_per_execution, bf16, XLA off,
#            XLA's deterministic ops, batch 2048 with 8x the learning rate
#
# Last, python -m offline_gpu.report turns what this run's parts wrote into
# markdown tables ($OUT/report.md).
#
# EXTRA_RUNS: experiments of an earlier kit to finish here (the node keeps their
# data and checkpoints); "auto": those with a checkpoint that no earlier run's
# summary lists as finished.
# GPU_REHEARSAL=1 runs every part on a sliver of the data for one or two
# epochs: a rehearsal on a CPU (KERAS_BACKEND=jax), not for results.
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=${GPU_KIT:-.gpu}
OUT=${OUT:-/tmp/offline_gpu_out}
SITE=${GPU_SITE:-/tmp/site}
WORK=${GPU_WORK:-/tmp/offline_gpu}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/on_node.log") 2>&1

if [ ! -d "$KIT/whl" ] || [ ! -d "$KIT/mirror" ]; then
    echo "on_node: no kit in $KIT (build it with python -m offline_gpu.kit where there is internet, and copy it here)"
    exit 2
fi
KIT=$(cd "$KIT" && pwd)
wheels=$(cd "$KIT/whl" && ls *.whl | sort)
if [ "$(cat "$SITE/.kit-wheels" 2>/dev/null)" != "$wheels" ]; then  # installed by an earlier run on this node
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$KIT"/whl/*.whl \
        || { echo "on_node: installing the kit's wheels failed"; exit 2; }
    echo "$wheels" > "$SITE/.kit-wheels"
fi
export PYTHONPATH="$SITE:$PWD" KERAS_BACKEND=jax DATA_MIRROR="$KIT/mirror" PYTHONUNBUFFERED=1 \
    XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=3
export MLFLOW_TRACKING_URI="sqlite:///$PWD/mlflow.db"
if [ -s "$KIT/settings.txt" ]; then  # as dvc exp run -S sets them; the copy's params.yaml loses its comments
    python3 - "$KIT/settings.txt" <<'PY' || { echo "on_node: the kit's settings do not apply to params.yaml"; exit 2; }
import sys
import yaml
from benchmarks.harness import PARAMS_FILE, apply_overrides, load_params
items = [line.strip() for line in open(sys.argv[1]) if line.strip()]
PARAMS_FILE.write_text(yaml.safe_dump(apply_overrides(load_params(), items), sort_keys=False))
print("on_node: params.yaml with", ", ".join(items))
PY
fi
EXPERIMENTS=$(cat "$KIT/experiments.txt")
FAST=cifar10_fast
finished() { python3 -c "import json,sys; print(' '.join(json.load(open(sys.argv[1])).get('experiments', {})))" "$1"; }
if [ "${EXTRA_RUNS:-}" = auto ]; then
    earlier=" $(for f in "$WORK/fast/summary.json" "$WORK/runs/summary.json"; do [ -f "$f" ] && finished "$f"; done | tr "\n" " ") "
    EXTRA_RUNS=$(for state in checkpoints/*/state.json; do
        name=$(basename "$(dirname "$state")"); [ -f "$state" ] && [[ "$earlier" != *" $name "* ]] && echo "$name"
    done)
    echo "on_node: finishing here what an earlier run left: ${EXTRA_RUNS:-none}"
fi
OTHERS="$(echo "$EXPERIMENTS" | grep -vx "$FAST") ${EXTRA_RUNS:-}"
STATE="$WORK/state.tar.gz"  # what an earlier commit part on this node left (restore brings it back)
if [ "${GPU_REHEARSAL:-0}" = 1 ]; then
    FRACTION=0.05 EPOCHS=2 RUN_SET=(--set limits.max_epochs=1 --set limits.max_samples=${REHEARSAL_SAMPLES:-2000})
else
    FRACTION=1 EPOCHS=3 RUN_SET=()
fi
export PATH="$SITE/bin:$PATH"
dvc() { python3 -m dvc "$@"; }

stamp() { echo "== $(date -u +%H:%M:%S) $*"; }
stamp "start: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo no GPU)"
python3 -c "import jax, keras, mlflow; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__, 'mlflow', mlflow.__version__)" \
    || { echo "on_node: the stack does not import"; exit 2; }

status=0
for part in "$@"; do
    stamp "part $part"
    started=$SECONDS
    failed=0
    case $part in
    restore)
        if [ -f "$STATE" ]; then tar xzf "$STATE" && echo "restored the earlier run's dvc.lock and outputs"
        else echo "on_node: nothing to restore (no earlier commit part on this node)"; fi ;;
    data)
        python3 -m offline_gpu.runs --data-only --det-runs 0 --out "$WORK/data" "${RUN_SET[@]}" $EXPERIMENTS \
            && cp "$WORK/data/summary.json" "$OUT/data.json" ;;
    fast)
        if echo "$EXPERIMENTS" | grep -qx "$FAST"; then
            python3 -m offline_gpu.runs --no-data --det-runs 0 --out "$WORK/fast" "${RUN_SET[@]}" $FAST || failed=1
            cp "$WORK/fast/summary.json" "$OUT/fast.json"; cp "$WORK/fast/results.tar.gz" "$OUT/fast_results.tar.gz"
            cp "$WORK/fast/logs.tar.gz" "$OUT/fast_logs.tar.gz"
            [ $failed = 0 ]
        fi ;;
    runs)
        python3 -m offline_gpu.runs --no-data --det-runs 0 --out "$WORK/runs" --deadline-s "${RUNS_DEADLINE_S:-420}" \
            "${RUN_SET[@]}" $OTHERS || failed=1
        cp "$WORK/runs/summary.json" "$OUT/runs.json"; cp "$WORK/runs/results.tar.gz" "$OUT/results.tar.gz"
        cp "$WORK/runs/logs.tar.gz" "$OUT/runs_logs.tar.gz"
        [ $failed = 0 ] ;;
    commit)
        done_=""
        for summary in "$WORK/fast/summary.json" "$WORK/runs/summary.json"; do
            [ -f "$summary" ] && done_="$done_ $(finished "$summary")"
        done
        # the data stages ran as commands too: committed, their outputs (the same md5 as at home) enter the cache
        stages=($(python3 -c "
import sys; from benchmarks.harness import data_needs, load_params
datasets, corruptions = data_needs(load_params(), sys.argv[1:])
print(' '.join([f'{s}@{d}' for d in datasets for s in ('download', 'prepare')] + [f'corrupt@{c}' for c in corruptions]))
" $EXPERIMENTS))
        for name in $done_; do stages+=("train@$name" "evaluate@$name"); done
        dvc config --local core.no_scm true && dvc config --local core.analytics false \
            && { [ ${#stages[@]} = 0 ] || dvc commit -f "${stages[@]}"; } || failed=1
        { echo "committed: ${stages[*]}"; echo "dvc status of those stages:"; dvc status "${stages[@]}"
          echo "dvc status of the whole pipeline:"; dvc status; } > "$OUT/dvc_status.txt" 2>&1 || failed=1
        cp dvc.lock "$OUT/dvc.lock"
        tar czf "$STATE" dvc.lock metrics plots reports models/*/run.json models/*/history.json 2>/dev/null
        [ $failed = 0 ] ;;
    report)
        all=$(python3 -c "from benchmarks.harness import load_params; print(' '.join(load_params()['experiments']))")
        missing=$(for name in $all; do
            [ -f "models/$name/model.keras" ] || echo "$name"; done)
        if [ -n "$missing" ]; then
            echo "on_node: report skipped, no model here for: $missing"
        else
            # dvc.yaml's report command, and the files it declares
            report=$(python3 -c "import shlex, benchmarks.harness as h; print(shlex.join(h.stage_command('report')))")
            written=$(python3 -c "import benchmarks.harness as h; print(' '.join(h.stage_outputs('report')))")
            eval "$report" && dvc commit -f report && cp dvc.lock "$OUT/dvc.lock" \
                && tar czf "$OUT/report.tar.gz" $written
        fi ;;
    cost)
        python3 -m benchmarks.train_cost mnist_cae cifar10_cnn --out "$OUT/cost.json" ;;
    bench)
        python3 -m benchmarks.bench_train --experiments mnist_cae cifar10_cnn --fraction "$FRACTION" \
            --epochs "$EPOCHS" --out "$OUT/bench.json" ;;
    options)
        mkdir -p "$WORK/options"
        i=0
        for option in "" \
                      "training.data_on_device=true" \
                      "training.data_on_device=true training.steps_per_execution=16" \
                      "training.mixed_precision=true" \
                      "training.jit_compile=false" \
                      "XLA_FLAGS=--xla_gpu_deterministic_ops=true" \
                      "training.batch_size=2048 training.learning_rate=0.008"; do
            i=$((i + 1))
            sets=() flags=${XLA_FLAGS:-}
            for item in $option; do
                case $item in XLA_FLAGS=*) flags=${item#XLA_FLAGS=} ;; *) sets+=(--set "$item") ;; esac
            done
            XLA_FLAGS=$flags python3 -m benchmarks.bench_train --ours-only --train-only --experiments mnist_cae \
                --fraction "$FRACTION" --epochs "$EPOCHS" "${sets[@]}" --out "$WORK/options/option$i.json" \
                || failed=1
            if [ -n "$flags" ]; then python3 - "$WORK/options/option$i.json" "$flags" <<'PY' || failed=1
import json, sys
path, flags = sys.argv[1:]
result = json.load(open(path))
result["xla_flags"] = flags  # the option is an environment variable, not a param: say so in the result
json.dump(result, open(path, "w"), indent=2)
PY
            fi
        done
        tar czf "$OUT/options.tar.gz" -C "$WORK" options && [ $failed = 0 ] ;;
    *)
        echo "on_node: unknown part '$part' (restore, data, fast, runs, commit, report, cost, bench, options)"; exit 2 ;;
    esac
    code=$?
    [ $code -ne 0 ] && status=1
    stamp "part $part: exit $code in $((SECONDS - started)) s"
done
python3 -m offline_gpu.report "$OUT" > "$OUT/report.md" || status=1  # this run's parts as markdown tables
exit $status
