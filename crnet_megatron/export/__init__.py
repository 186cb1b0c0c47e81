"""After training: a checkpoint as one single-process model, HF export, generation,
perplexity, and the self-contained ``modeling_crnet.py`` an export carries."""
