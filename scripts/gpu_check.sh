#!/bin/bash
# The GPU paths end to end on a machine with one GPU: crop with YuNet and with YOLO (whose actors ask for
# a GPU share), train --use-gpu (NCCL process group) and its resume, score through the two-stage GPU path,
# and the Predictor on CUDA against the CPU runtime.
#   scripts/gpu_check.sh IMAGES YUNET_WEIGHTS [OUTPUT]
# IMAGES: a few hundred UTKFace-named images. WHEELS=dir installs wheels from dir first (machines that
# lack packages and an index). Each step prints its exit status; the log is the result.
set -u
IMAGES=$1; YUNET=$2; O=${3:-/tmp/agepipe-gpu-check}; W=$(mktemp -d)
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
mkdir -p "$O" ~/.cache/agepipe && cp "$YUNET" ~/.cache/agepipe/
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 3
  export PYTHONPATH=$PWD:/tmp/site
fi
PY=${PY:-python3}; A="$PY -m agepipe.cli"; t0=$(date +%s)
step() { echo "=== $(($(date +%s) - t0))s: $*"; }
$PY -c "import ray, torch; print('ray', ray.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
step crop yunet
$A crop --input "$IMAGES" --output $W/faces --labels utkface --detector yunet --detector-weights "$YUNET"; echo "rc=$?"
step "crop yolo (random weights from the YAML; the check is where it runs)"
(while sleep 0.5; do nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader; done) \
  > "$O/gpu_apps_during_yolo_crop.txt" 2>/dev/null &
poll=$!
$A crop --input "$IMAGES" --output $W/faces-yolo --detector yolo --detector-weights yolov8n.yaml --min-score 0.01
echo "rc=$?"; kill $poll
echo "processes on the GPU during the YOLO crop:"; cut -d, -f2 "$O/gpu_apps_during_yolo_crop.txt" | sort | uniq -c
for attempt in train "train again (resumes: nothing left to do)"; do
  step "$attempt --use-gpu"
  $A train --data $W/faces --output $W/run --use-gpu --num-workers 1 --pretrained none \
    --phase1-epochs 1 --phase2-epochs 2 --batch-size 64 > $W/train.log 2>&1
  echo "rc=$?"; grep "^train:" $W/train.log
done
cp $W/run/metrics.csv "$O/train_metrics_gpu.csv"
step score, GPU path, the default model and the GPU-trained one
$A score --input "$IMAGES" --output $W/scored --labels utkface; echo "rc=$?"
$A score --input "$IMAGES" --output $W/scored-run --model $W/run/model.pt; echo "rc=$?"
step Predictor on CUDA against the CPU runtime
$PY - "$W" <<'PYEOF'
import io, sys
import numpy as np, pyarrow.parquet as pq
from PIL import Image
from agepipe.predict import Predictor
work = sys.argv[1]
scored = pq.read_table(f"{work}/scored").to_pandas().dropna(subset=["age"])
print("GPU-path score: faces", len(scored), "MAE", round(float((scored.age - scored.label_age).abs().mean()), 4))
images = pq.read_table(f"{work}/faces", columns=["image"]).column("image").to_pylist()
crops = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images if b]
gpu, cpu = Predictor(device="cuda"), Predictor(device="cpu")
a = np.array([r["age"] for r in gpu.predict_crops(crops)])
b = np.array([r["age"] for r in cpu.predict_crops(crops)])
print(f"{gpu.runtime_name} on {gpu.device} vs {cpu.runtime_name} on {cpu.device}, {len(crops)} faces: "
      f"max |age difference| {np.abs(a - b).max():.4f}, mean {np.abs(a - b).mean():.4f} years")
PYEOF
step done
