"""The tiny CR-Net the self-test, the benchmarks, the soak and the tests train on CPU, stated
once as run-config overrides (``--set`` style): its shape, and the switches that keep a short
run quiet. Callers add only their schedule and what they test."""

TINY_HIDDEN, TINY_FFN, TINY_HEADS, TINY_VOCAB = 64, 172, 4, 512

TINY_MODEL = [f"model.hidden_size={TINY_HIDDEN}", f"model.ffn_hidden_size={TINY_FFN}",
              f"model.num_attention_heads={TINY_HEADS}", "model.num_layers=4",
              "model.crnet_rank=16", "model.seq_length=32",
              f"data.builtin_vocab_size={TINY_VOCAB}"]
QUIET = ["logging.progress_bar=false", "logging.plot=false"]
