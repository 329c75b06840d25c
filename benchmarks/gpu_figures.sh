#!/usr/bin/env bash
# The GPU figures of the engine and speed work, gathered in one run on a GPU machine.
#
#   bash benchmarks/gpu_figures.sh DATA_TAR_GZ OUT_DIR
#
# DATA_TAR_GZ: the CIFAR-10 JPEG archive (cifar10/{train,test}/<class>/*.jpg).
# OUT_DIR receives seven files: environment.txt, update.json, throughput.json,
# speedrun.json, resnet9.json, airbench.txt and log.txt (every step's output).
#
# Steps, each bounded by its own timeout (570 s in all, so the run fits a 10-minute
# command with the data's unpacking), each run even when an earlier one failed:
#   1. the update step on the ResNet-18 and 500-leaf trees: sgdjax and optax on the
#      GPU against torch's foreach and fused SGD on the GPU (update_overhead.py);
#   2. training throughput, ConvNet and ResNet-9 at batch 512: sgdjax and flax+optax
#      against torch eager, torch.compile and eager with fused SGD (train_throughput.py);
#   3. the speedrun preset at full width, 5 seeds after one compilation (accuracy,
#      seconds with and without compile);
#   4. the resnet9 preset: images/s and the time to 93% test accuracy;
#   5. airbench94 beside it, when AIRBENCH_CMD names the command that runs it on this
#      data (its code is not part of this project).
#
# SMOKE=1 runs every step at toy sizes, on a CPU too, to check the script itself.
set -u
data=${1:?DATA_TAR_GZ}
out=${2:?OUT_DIR}
smoke=${SMOKE:-0}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
mkdir -p "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
log="$out/log.txt"
: >"$log"

step() {  # step SECONDS NAME COMMAND...: run COMMAND with a timeout, its output into the log
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" >>"$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "=== $name: exit $?" >>"$log"
}

{
    date -u
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "no nvidia-smi"; fi
    "$python" -c "import jax, torch; print('jax', jax.__version__, jax.devices()); \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1
    git -C "$root" rev-parse HEAD 2>&1
} >"$out/environment.txt"

torch_device=$("$python" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
tar -xzf "$data" -C "$work"
cifar="$work/cifar10"
runs="$work/runs"

if [ "$smoke" = 1 ]; then
    update=(--quick)
    throughput=(--quick)
    speedrun=(--runs 2 --epochs 1 --max-steps 2 --widths 8 16 16 --batch-size 64
              --train-subset 256 --test-subset 200 --whiten-images 256)
    resnet9=(--epochs 1 --max-steps 2 --batch-size 32 --train-subset 128 --test-subset 200)
else
    update=(--repeats 50)
    throughput=(--models convnet resnet9 --batch-sizes 512 --steps 30)
    speedrun=(--runs 5)
    resnet9=()
fi

step 60 update "$python" "$root/benchmarks/update_overhead.py" "${update[@]}" \
    --trees resnet18 small500 --libraries sgdjax optax torch-foreach torch-fused \
    --no-memory --torch-device "$torch_device" --out "$out/update.json"
step 150 throughput "$python" "$root/benchmarks/train_throughput.py" "${throughput[@]}" \
    --contenders sgdjax flax+optax "torch eager" "torch.compile" "torch eager fused SGD" \
    --torch-device "$torch_device" --out "$out/throughput.json"
step 150 speedrun "$python" "$root/experiments/cifar.py" --preset speedrun "${speedrun[@]}" \
    --data-dir "$cifar" --out "$runs/speedrun" --no-progress --no-tensorboard
step 150 resnet9 "$python" "$root/experiments/cifar.py" --preset resnet9 "${resnet9[@]}" \
    --data-dir "$cifar" --out "$runs/resnet9" --no-progress --no-tensorboard
if [ -n "${AIRBENCH_CMD:-}" ]; then
    echo "=== airbench: $AIRBENCH_CMD" >>"$log"
    timeout 60 bash -c "$AIRBENCH_CMD" >"$out/airbench.txt" 2>&1
    echo "=== airbench: exit $?" >>"$log"
else
    echo "AIRBENCH_CMD was not set: airbench94 did not run" >"$out/airbench.txt"
fi

# The speed run's summary (mean and spread over seeds) and the resnet9 run's
# images/s and time to 93%, read from the runs' own files.
"$python" - "$runs" "$out" <<'PY' >>"$log" 2>&1
import json, sys
from pathlib import Path

runs, out = Path(sys.argv[1]), Path(sys.argv[2])
speed = runs / "speedrun" / "summary.json"
if speed.exists():
    (out / "speedrun.json").write_text(speed.read_text())
folder = runs / "resnet9"
if (folder / "summary.json").exists():
    summary = json.loads((folder / "summary.json").read_text())
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    seconds, reached = 0.0, None
    for row in history:
        seconds += row["epoch_seconds"]
        if reached is None and (row.get("test_accuracy") or 0) >= 0.93:
            reached = {"epoch": row["epoch"], "train_seconds": seconds}
    result = {
        "test_accuracy": summary["test_accuracy"],
        "images_per_second": summary["images_per_second"],
        "compile_seconds": summary["compile_seconds"],
        "wall_seconds": summary["wall_seconds"],
        "time_to_93": reached,
        "epochs": [{k: row.get(k) for k in ("epoch", "test_accuracy", "epoch_seconds")}
                   for row in history],
        "environment": summary["environment"],
    }
    (out / "resnet9.json").write_text(json.dumps(result, indent=1))
    print("resnet9:", {k: result[k] for k in ("test_accuracy", "images_per_second", "time_to_93")})
PY
rm -rf "$work"
