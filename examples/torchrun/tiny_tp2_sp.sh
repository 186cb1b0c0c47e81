#!/usr/bin/env bash
# Tiny CR-Net on 2 CPU processes (gloo) or 2 GPUs (NCCL): TP=2 with sequence parallel.
set -euo pipefail
cd "$(dirname "$0")/../.."
torchrun --standalone --nproc-per-node 2 -m crnet_megatron.train examples/configs/tiny_cpu.yaml \
  --set parallel.tensor_model_parallel_size=2 --set parallel.sequence_parallel=true "$@"
