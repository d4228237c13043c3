#!/usr/bin/env bash
# CIFAR-10 SimCLR and Barlow Twins at GPU scale beside lightly's pipelines (benchmarks/gpu_reference.yaml),
# then pairs/s and kNN of each run.
#   benchmarks/gpu_reference.sh            # on a GPU: writes benchmarks/results/gpu_reference_cuda.txt (about 6 min)
#   benchmarks/gpu_reference.sh --smoke    # on a CPU in a minute: a generated JPEG folder, 2 steps per run, a scratch store
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
suite=(--config benchmarks/gpu_reference.yaml)
if [ "${1:-}" = "--smoke" ]; then
    scratch=$(mktemp -d)
    "$python" - "$scratch/images" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for index in range(80):
    folder = Path(sys.argv[1]) / "train" / f"class{index % 4}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index}.jpg")
PY
    suite+=(--store "$scratch/store.sqlite" --workdir "$scratch/runs" --report "$scratch/report"
            --dataset_args "{\"CIFAR10\": [\"--data.root\", \"$scratch/images\", \"--trainer.enable_progress_bar\", \"false\",
              \"--trainer.limit_val_batches\", \"0\", \"--trainer.max_epochs\", \"1\", \"--trainer.max_time\", \"null\",
              \"--trainer.limit_train_batches\", \"2\", \"--data.batch_size\", \"8\", \"--data.num_workers\", \"0\",
              \"--data.cache_dir\", \"$scratch/cache\", \"--model.channels_last\", \"true\", \"--trainer.accelerator\", \"cpu\"]}")
    out=$scratch/gpu_reference_smoke.txt
else
    out=benchmarks/results/gpu_reference_cuda.txt
fi
"$python" -m ssl_kit.bench "${suite[@]}"
store=$("$python" -c "import sys, yaml; print(yaml.safe_load(open('benchmarks/gpu_reference.yaml'))['store'])")
[ -n "${scratch:-}" ] && store=$scratch/store.sqlite
"$python" - "$store" "$out" <<'PY'
import sys, json, sqlite3
store, out = sys.argv[1:]
rows = sqlite3.connect(store).execute(
    "select method, throughput, value, hardware, epochs from results where suite = 'gpu_reference' and protocol = 'knn' order by id"
).fetchall()
lines = ["| run | pairs/s | kNN top-1 | epochs | hardware |", "|---|---:|---:|---:|---|"]
lines += [f"| {m} | {t or 0:.0f} | {100 * v:.1f} | {e:g} | {h} |" for m, t, v, h, e in rows]
report = "\n".join(lines)
print(report)
open(out, "w").write(report + "\n")
PY
echo "written: $out"
