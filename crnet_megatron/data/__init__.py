"""Corpus, tokenizer, preprocessing, start-up validation of data files, evaluation windows."""
