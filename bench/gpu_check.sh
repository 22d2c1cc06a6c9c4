#!/usr/bin/env bash
# The GPU checks in one go, for a CUDA machine:
#   1. tests/test_cuda.py (every architecture option on the GPU against the CPU, bf16 training,
#      decoding, the memory estimate against the CUDA allocator's peak);
#   2. every rule of the workflow on the GPU (`all` on the tests' tiny config);
#   3. the two speed benches on the GPU, against transformers;
#   4. the embedded default on the GPU: the headline target, then `all`, each timed.
#
#   bench/gpu_check.sh [OUTDIR] [SECONDS_FOR_STEP_4]     (default results/gpu, 240)
#   STEPS=24 bench/gpu_check.sh ...                      runs only steps 2 and 4
#
# $PYTHON (default: .venv/bin/python after `make setup`, else python3) must import torch with CUDA,
# transformers, snakemake and the packages of requirements.lock; lmforge is taken from lib/.
# MLflow tracking is off (results/ are the record).
set -uo pipefail
out=$(realpath -m "${1:-results/gpu}")
budget=${2:-240}
steps=${STEPS:-1234}
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=$PWD/.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$out"
export PYTHONPATH="$PWD/lib${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
stamp() { date +%s.%N; }
took() { "$PYTHON" -c "print(f'{$(stamp) - $1:.1f}')"; }

"$PYTHON" -c "import torch; raise SystemExit(not torch.cuda.is_available())" || {
    echo "bench/gpu_check.sh: $PYTHON sees no CUDA device (torch.cuda.is_available() is False)" >&2; exit 1; }
"$PYTHON" -c "import torch, transformers, datasets, pyarrow; print('torch', torch.__version__, 'transformers',
      transformers.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__, torch.cuda.get_device_name())" | tee "$out/summary.txt"

step() { [[ $steps == *$1* ]]; }

step 1 && { echo "== 1. tests/test_cuda.py" | tee -a "$out/summary.txt"
"$PYTHON" -m pytest -q -p no:cacheprovider -s tests/test_cuda.py > "$out/pytest.log" 2>&1
echo "pytest exit $? : $(tail -1 "$out/pytest.log")" | tee -a "$out/summary.txt"; }

work=$(mktemp -d)
step 2 && { echo "== 2. snakemake all, tiny config, device cuda" | tee -a "$out/summary.txt"
"$PYTHON" - "$work" <<'EOF'
import sys, yaml
cfg = yaml.safe_load(open("tests/data/tiny.yaml"))
cfg.update(device="cuda", tracking={"enabled": False, "uri": None})
yaml.safe_dump(cfg, open(f"{sys.argv[1]}/config.yaml", "w"))
EOF
t=$(stamp)
"$PYTHON" -m snakemake --scheduler greedy -s "$PWD/Snakefile" --directory "$work" --configfile "$work/config.yaml" --cores 4 all \
    > "$out/tiny_all.log" 2>&1
echo "snakemake exit $? in $(took "$t") s; devices: $(grep -ho '"device": "[a-z:0-9]*"' "$work"/results/*/metrics.json | sort | uniq -c | tr '\n' ' ')" \
    | tee -a "$out/summary.txt"
cp "$work/results/eval/metrics.csv" "$out/tiny_eval_metrics.csv" 2>/dev/null || tail -n 30 "$work"/results/logs/*.log >> "$out/tiny_all.log"; }

step 3 && { echo "== 3. benches" | tee -a "$out/summary.txt"
# Bigger fused-loss chunks (2^24, 2^26 logits) against the CPU-sized default: fewer kernel launches.
for batch in 8 64; do
    "$PYTHON" bench/train_speed.py --device cuda --compile --batch "$batch" --steps 20 --chunk-elements 16777216 67108864 \
        2>&1 | grep -v Warning | tee -a "$out/summary.txt"
done
"$PYTHON" bench/decode_speed.py --device cuda --compile --json "$out/decode_speed.json" 2>&1 | grep -v Warning \
    | tee -a "$out/summary.txt"; }

step 4 || exit 0
echo "== 4. embedded default on the GPU (budget ${budget} s)" | tee -a "$out/summary.txt"
printf 'device: cuda\ntracking: {enabled: false}\n' > "$work/gpu.yaml"
t=$(stamp)
timeout "$budget" "$PYTHON" -m snakemake --scheduler greedy --cores 4 results/dpo/model.pt --configfile config/config.yaml "$work/gpu.yaml" \
    > "$out/default.log" 2>&1
echo "results/dpo/model.pt: exit $? in $(took "$t") s" | tee -a "$out/summary.txt"
left=$("$PYTHON" -c "print(max(1, int($budget - ($(stamp) - $t))))")
t=$(stamp)
timeout "$left" "$PYTHON" -m snakemake --scheduler greedy --cores 4 all --configfile config/config.yaml "$work/gpu.yaml" >> "$out/default.log" 2>&1
echo "all (afterwards): exit $? in $(took "$t") s" | tee -a "$out/summary.txt"
"$PYTHON" - "$out" <<'EOF' | tee -a "$out/summary.txt"
import json, pathlib, sys
for m in sorted(pathlib.Path("results").glob("*/metrics.json")):
    d = json.loads(m.read_text())
    print(m.parent.name, {k: d[k] for k in ("device", "wall_s", "steps", "tokens_per_s") if k in d})
EOF
cp results/eval/metrics.csv "$out/default_eval_metrics.csv" 2>/dev/null || tail -n 30 results/logs/*.log >> "$out/default.log"
exit 0
