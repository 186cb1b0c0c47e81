"""What the network is: config, the positions table, chain ops, TP linears, layers, block, GPT
model, specs, layout-invariant init. Imports nothing here (``positions`` and ``choices`` are
read without torch)."""
