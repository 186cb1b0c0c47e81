#!/usr/bin/env bash
# CR-Net LLaMA-2 7B (r=512) on one 8-GPU node: TP=2 + SP, DP=4, CR-Net recompute, bf16.
set -euo pipefail
cd "$(dirname "$0")/../.."
torchrun --standalone --nproc-per-node 8 -m crnet_megatron.train examples/configs/llama2_7b.yaml "$@"
