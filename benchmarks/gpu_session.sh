#!/usr/bin/env bash
# The GPU benchmark session, run on the lent GPU machine from the repo's root,
# with the kit that benchmarks/gpu_kit.py packed here carried as .gpu:
#
#   benchmarks/gpu_session.sh PART...      (OUT: where results go; set there)
#
# Parts, in the order given (each writes its results as soon as it ends, so a
# call stopped at its time limit still returns what finished):
#   data     download, prepare and corrupt what the six seed experiments read
#            (from the carried mirror); needed once per machine before the rest
#   cost     FLOPs and bytes of a train step, counted from the layers and by XLA
#   bench    ours against the seed's plain Keras script, mnist_cae and cifar10_cnn,
#            all images, seed batch sizes (throughput, epoch, memory, ratio)
#   options  mnist_cae at batch 256, ours only, one option at a time: data on the
#            device, steps_per_execution, bf16, XLA off, batch 2048 with 8x the
#            learning rate
#   seeds    the six seed experiments at their seed settings, train + evaluate,
#            side by side on the one GPU (benchmarks/gpu_runs.py): the 5-minute
#            target; its summary and logs (models stay there: over the size limit)
#
# Last, benchmarks/gpu_report.py turns what this call's parts wrote into
# markdown tables ($OUT/report.md); run it again here on the files of both
# calls, copied into one folder, for the docs.
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
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$KIT"/whl/*.whl \
    || { echo "gpu_session: installing the carried wheels failed"; exit 2; }
export PYTHONPATH="$SITE:$PWD" KERAS_BACKEND=jax DATA_MIRROR="$KIT/mirror" PYTHONUNBUFFERED=1 \
    XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=3
export MLFLOW_TRACKING_URI="sqlite:///$PWD/mlflow.db"
SEEDS="mnist_cae mnist_denoise cifar10_cae_4pool cifar10_cae_3pool cifar10_cnn colored_mnist_cnn"
if [ "${GPU_SESSION_REHEARSAL:-0}" = 1 ]; then
    FRACTION=0.05 EPOCHS=2 SEED_SET=(--set limits.max_epochs=1 --set limits.max_samples=2000)
else
    FRACTION=1 EPOCHS=4 SEED_SET=()
fi

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
    data)
        python3 benchmarks/gpu_runs.py --data-only --det-runs 0 --out /tmp/gpu_data $SEEDS ;;
    cost)
        python3 benchmarks/train_cost.py mnist_cae cifar10_cnn --out "$OUT/cost.json" ;;
    bench)
        python3 benchmarks/bench_train.py --experiments mnist_cae cifar10_cnn --fraction "$FRACTION" \
            --epochs "$EPOCHS" --out "$OUT/bench.json" ;;
    options)
        mkdir -p /tmp/gpu_options
        i=0
        for option in "training.data_on_device=true" \
                      "training.data_on_device=true training.steps_per_execution=16" \
                      "training.mixed_precision=true" \
                      "training.jit_compile=false" \
                      "training.batch_size=2048 training.learning_rate=0.008"; do
            i=$((i + 1))
            sets=()
            for item in $option; do sets+=(--set "$item"); done
            python3 benchmarks/bench_train.py --ours-only --train-only --experiments mnist_cae \
                --fraction "$FRACTION" --epochs "$EPOCHS" "${sets[@]}" --out "/tmp/gpu_options/option$i.json" \
                || failed=1
        done
        tar czf "$OUT/options.tar.gz" -C /tmp gpu_options && [ $failed = 0 ] ;;
    seeds)
        python3 benchmarks/gpu_runs.py --det-runs 0 --no-pack --out /tmp/gpu_seeds "${SEED_SET[@]}" $SEEDS \
            || failed=1
        cp /tmp/gpu_seeds/summary.json "$OUT/seeds.json"
        cp /tmp/gpu_seeds/logs.tar.gz "$OUT/seeds_logs.tar.gz"
        [ $failed = 0 ] ;;
    *)
        echo "gpu_session: unknown part '$part' (data, cost, bench, options, seeds)"; exit 2 ;;
    esac
    code=$?
    [ $code -ne 0 ] && status=1
    stamp "part $part: exit $code in $((SECONDS - started)) s"
done
python3 benchmarks/gpu_report.py "$OUT" > "$OUT/report.md" || status=1  # this call's parts as the docs' tables
exit $status
