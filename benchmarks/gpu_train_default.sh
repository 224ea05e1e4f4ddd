#!/usr/bin/env bash
# Issue 12's device run, prepared on the CPU and not yet run: no GPU was lent to the session that wrote it.
#
# It trains, on one H200, the LQAE default-checkpoint recipe and the paper's VQ-VAE baseline for the same budget
# (the same steps, batch and learning rate), then evaluates both with benchmarks/evaluate_checkpoint.py. The LLM
# rows are left out (--llm-episodes 0): they are rerun on the CPU afterwards, with the checkpoint that is shipped.
#
#   bash benchmarks/gpu_train_default.sh OUT [STEPS]
#
# STEPS defaults to 5000 steps of 512 images: 42.7 epochs of Fashion-MNIST. At the 9,100-9,600 images/s that the
# small-28 preset trained at on an H200 (docs/benchmarks.md), that is about 4.6 minutes for the LQAE. The VQ-VAE
# has no LM in its step: on the CPU it trained about 3x as fast per image. The two evaluations encode 70k images
# each. Fashion-MNIST must be in $LQAE_FASHION_MNIST, because the device reaches no network.
# It writes OUT/{lqae,vqvae}/checkpoint, their metrics.jsonl, and OUT/eval_{lqae,vqvae}.{json,md}.
# A CPU smoke test of the whole script: DEVICE=cpu BATCH=8 EVAL_ARGS="--train-limit 200 --test-limit 100
# --episodes 20" bash benchmarks/gpu_train_default.sh /tmp/smoke 2
set -euo pipefail
out=${1:?usage: gpu_train_default.sh OUT [STEPS]}
steps=${2:-5000}
device=${DEVICE:-cuda}
mkdir -p "$out"
bf16=--bf16; [ "$device" = cpu ] && bf16=--no-bf16
common=(--data fashion-mnist --steps "$steps" --batch-size "${BATCH:-512}" --lr 3e-4 --crop-scale 0.5 1.0
        --save-every "$steps" --log-every 100 --eval-images 1000 --device "$device" "$bf16" --no-progress)
python -m lqae_sklearn.training.cli --preset small-28 "${common[@]}" --out "$out/lqae"
python -m lqae_sklearn.training.cli --preset small-28-vqvae "${common[@]}" --out "$out/vqvae"
for run in lqae vqvae; do
  # shellcheck disable=SC2086 # EVAL_ARGS is a list of options
  python benchmarks/evaluate_checkpoint.py "$out/$run/checkpoint" --device "$device" --batch-size 1024 \
    --llm-episodes 0 ${EVAL_ARGS:-} --out "$out/eval_$run"
done
