#!/usr/bin/env bash
# CR-Net LLaMA 1B (r=448, 582.4M parameters) on one node: DP=8, bf16.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CUDA_DEVICE_MAX_CONNECTIONS=1  # Megatron: ordered TP/SP communication kernels
# DRY_RUN=1: every rank prints its command and environment instead of training
dry=()
if [[ -n "${DRY_RUN:-}" ]]; then dry=(--dry-run); fi
torchrun --standalone --nproc-per-node 8 -m crnet_megatron.cli.train examples/configs/llama_1b.yaml "${dry[@]}" "$@"
