#!/usr/bin/env bash
# CR-Net LLaMA 1B (r=448, 582.4M parameters) on one node: DP=8, bf16.
set -euo pipefail
cd "$(dirname "$0")/../.."
torchrun --standalone --nproc-per-node 8 -m crnet_megatron.train examples/configs/llama_1b.yaml "$@"
