#!/usr/bin/env bash
# The GPU session, run on the lent GPU machine from the repo's root, with a
# kit that benchmarks/gpu_kit.py packed here carried (GPU_KIT, default .gpu):
#
#   IMAGEPIPE_SOURCE_COMMIT=<commit> benchmarks/gpu_session.sh PART...   (OUT: where results go)
#
# Parts, in the order given (each writes its results as soon as it ends, so a
# call stopped at its time limit still returns what finished):
#   restore  on a warm machine, what the last call's commit part left (dvc.lock and
#            the small outputs: the tree sent with each call has the old ones)
#   data     download, prepare and corrupt what the kit's experiments read
#            (from the carried mirror); needed once per machine before the rest
#   fast     cifar10_fast alone on the GPU (train + evaluate), if the kit has it:
#            its train seconds are a target, so nothing shares the GPU with it
#   runs     every other experiment of the kit at its full settings, side by side
#            on the one GPU (benchmarks/gpu_runs.py), stopped at RUNS_DEADLINE_S
#            seconds (a stopped train resumes from its checkpoint next time)
#   commit   dvc commit of the train@ and evaluate@ stages that finished (DVC runs
#            with core.no_scm: the copied tree's git, if any, is not the source's),
#            then dvc status; brings back dvc.lock and the status
#   report   the report stage and its dvc commit, when every experiment's model is here
#   cost     FLOPs and bytes of a train step, counted from the layers and by XLA
#   bench    ours against the seed's plain Keras script, mnist_cae and cifar10_cnn,
#            all images, seed batch sizes (throughput, epoch, memory, ratio)
#   options  mnist_cae at batch 256, ours only: as in params.yaml, then one option
#            at a time: data on the device, steps_per_execution, bf16, XLA off,
#            XLA's deterministic ops, batch 2048 with 8x the learning rate
#
# Last, benchmarks/gpu_report.py turns what this call's parts wrote into
# markdown tables ($OUT/report.md).
#
# GPU_SESSION_REHEARSAL=1 runs every part on a sliver of the data for one or
# two epochs: a rehearsal on a CPU (KERAS_BACKEND=jax), never for the docs.
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=${GPU_KIT:-.gpu}
OUT=${OUT:-/tmp/gpu_session_out}
SITE=${GPU_SITE:-/tmp/site}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1

if [ ! -d "$KIT/whl" ] || [ ! -d "$KIT/mirror" ]; then
    echo "gpu_session: no kit in $KIT (run benchmarks/gpu_kit.py here first and carry $KIT)"; exit 2
fi
KIT=$(cd "$KIT" && pwd)
wheels=$(cd "$KIT/whl" && ls *.whl | sort)
if [ "$(cat "$SITE/.kit-wheels" 2>/dev/null)" != "$wheels" ]; then  # a warm machine keeps them from the last call
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$KIT"/whl/*.whl \
        || { echo "gpu_session: installing the carried wheels failed"; exit 2; }
    echo "$wheels" > "$SITE/.kit-wheels"
fi
export PYTHONPATH="$SITE:$PWD" KERAS_BACKEND=jax DATA_MIRROR="$KIT/mirror" PYTHONUNBUFFERED=1 \
    XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=3
export MLFLOW_TRACKING_URI="sqlite:///$PWD/mlflow.db"
EXPERIMENTS=$(cat "$KIT/experiments.txt")
FAST=cifar10_fast
# EXTRA_RUNS: experiments of an earlier call's kit to finish here (a warm machine keeps their data and
# checkpoints); "auto": those with a checkpoint that no earlier call's summary lists as finished
finished() { python3 -c "import json,sys; print(' '.join(json.load(open(sys.argv[1])).get('experiments', {})))" "$1"; }
if [ "${EXTRA_RUNS:-}" = auto ]; then
    earlier=" $(for f in /tmp/gpu_fast/summary.json /tmp/gpu_runs/summary.json; do [ -f $f ] && finished $f; done | tr "\n" " ") "
    EXTRA_RUNS=$(for state in checkpoints/*/state.json; do
        name=$(basename "$(dirname "$state")"); [ -f "$state" ] && [[ "$earlier" != *" $name "* ]] && echo "$name"
    done)
    echo "gpu_session: finishing here what an earlier call left: ${EXTRA_RUNS:-none}"
fi
OTHERS="$(echo "$EXPERIMENTS" | grep -vx "$FAST") ${EXTRA_RUNS:-}"
STATE=/tmp/gpu_session_state.tar.gz  # what an earlier call on this machine committed (the tree is sent anew each call)
if [ "${GPU_SESSION_REHEARSAL:-0}" = 1 ]; then
    FRACTION=0.05 EPOCHS=2 RUN_SET=(--set limits.max_epochs=1 --set limits.max_samples=${REHEARSAL_SAMPLES:-2000})
else
    FRACTION=1 EPOCHS=3 RUN_SET=()
fi
export PATH="$SITE/bin:$PATH"
dvc() { python3 -m dvc "$@"; }

stamp() { echo "== $(date -u +%H:%M:%S) $*"; }
stamp "start: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo no GPU)"
python3 -c "import jax, keras, mlflow; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__, 'mlflow', mlflow.__version__)" \
    || { echo "gpu_session: the stack does not import"; exit 2; }

status=0
for part in "$@"; do
    stamp "part $part"
    started=$SECONDS
    failed=0
    case $part in
    restore)
        if [ -f "$STATE" ]; then tar xzf "$STATE" && echo "restored the earlier call's dvc.lock and outputs"
        else echo "gpu_session: nothing to restore (a new machine)"; fi ;;
    data)
        python3 benchmarks/gpu_runs.py --data-only --det-runs 0 --out /tmp/gpu_data "${RUN_SET[@]}" $EXPERIMENTS \
            && cp /tmp/gpu_data/summary.json "$OUT/data.json" ;;
    fast)
        if echo "$EXPERIMENTS" | grep -qx "$FAST"; then
            python3 benchmarks/gpu_runs.py --no-data --det-runs 0 --out /tmp/gpu_fast "${RUN_SET[@]}" $FAST || failed=1
            cp /tmp/gpu_fast/summary.json "$OUT/fast.json"; cp /tmp/gpu_fast/results.tar.gz "$OUT/fast_results.tar.gz"
            cp /tmp/gpu_fast/logs.tar.gz "$OUT/fast_logs.tar.gz"
            [ $failed = 0 ]
        fi ;;
    runs)
        python3 benchmarks/gpu_runs.py --no-data --det-runs 0 --out /tmp/gpu_runs --deadline-s "${RUNS_DEADLINE_S:-420}" \
            "${RUN_SET[@]}" $OTHERS || failed=1
        cp /tmp/gpu_runs/summary.json "$OUT/runs.json"; cp /tmp/gpu_runs/results.tar.gz "$OUT/results.tar.gz"
        cp /tmp/gpu_runs/logs.tar.gz "$OUT/runs_logs.tar.gz"
        [ $failed = 0 ] ;;
    commit)
        done_=""
        for summary in /tmp/gpu_fast/summary.json /tmp/gpu_runs/summary.json; do
            [ -f "$summary" ] && done_="$done_ $(finished "$summary")"
        done
        # the data stages ran as commands too: committed, their outputs (the same md5 as at home) enter the cache
        stages=($(python3 -c "
import sys, yaml; sys.path.insert(0, 'benchmarks'); from gpu_runs import data_needs
datasets, corruptions = data_needs(yaml.safe_load(open('params.yaml')), sys.argv[1:])
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
        missing=$(for name in $(python3 -c "import yaml; print(' '.join(yaml.safe_load(open('params.yaml'))['experiments']))"); do
            [ -f "models/$name/model.keras" ] || echo "$name"; done)
        if [ -n "$missing" ]; then
            echo "gpu_session: report skipped, no model here for: $missing"
        else
            python3 -m stages.report --metrics metrics --reports reports --models models --out reports --plots plots \
                && dvc commit -f report && cp dvc.lock "$OUT/dvc.lock" \
                && tar czf "$OUT/report.tar.gz" reports/index.html reports/summary.md plots/accuracy plots/confusion
        fi ;;
    cost)
        python3 benchmarks/train_cost.py mnist_cae cifar10_cnn --out "$OUT/cost.json" ;;
    bench)
        python3 benchmarks/bench_train.py --experiments mnist_cae cifar10_cnn --fraction "$FRACTION" \
            --epochs "$EPOCHS" --out "$OUT/bench.json" ;;
    options)
        mkdir -p /tmp/gpu_options
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
            XLA_FLAGS=$flags python3 benchmarks/bench_train.py --ours-only --train-only --experiments mnist_cae \
                --fraction "$FRACTION" --epochs "$EPOCHS" "${sets[@]}" --out "/tmp/gpu_options/option$i.json" \
                || failed=1
            if [ -n "$flags" ]; then python3 - "/tmp/gpu_options/option$i.json" "$flags" <<'PY' || failed=1
import json, sys
path, flags = sys.argv[1:]
result = json.load(open(path))
result["xla_flags"] = flags  # the option is an environment variable, not a param: say so in the result
json.dump(result, open(path, "w"), indent=2)
PY
            fi
        done
        tar czf "$OUT/options.tar.gz" -C /tmp gpu_options && [ $failed = 0 ] ;;
    *)
        echo "gpu_session: unknown part '$part' (restore, data, fast, runs, commit, report, cost, bench, options)"; exit 2 ;;
    esac
    code=$?
    [ $code -ne 0 ] && status=1
    stamp "part $part: exit $code in $((SECONDS - started)) s"
done
python3 benchmarks/gpu_report.py "$OUT" > "$OUT/report.md" || status=1  # this call's parts as the docs' tables
exit $status
