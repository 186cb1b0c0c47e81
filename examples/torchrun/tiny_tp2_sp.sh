#!/usr/bin/env bash
# Tiny CR-Net on 2 CPU processes (gloo) or 2 GPUs (NCCL): TP=2 with sequence parallel.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CUDA_DEVICE_MAX_CONNECTIONS=1  # Megatron: ordered TP/SP communication kernels
# DRY_RUN=1: every rank prints its command and environment instead of training
dry=()
if [[ -n "${DRY_RUN:-}" ]]; then dry=(--dry-run); fi
torchrun --standalone --nproc-per-node 2 -m crnet_megatron.cli.train examples/configs/tiny_cpu.yaml "${dry[@]}" \
  --set parallel.tensor_model_parallel_size=2 --set parallel.sequence_parallel=true "$@"
