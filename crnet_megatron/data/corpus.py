"""A built-in corpus of real English text available offline: the docstrings of Python's
standard library (module, class and function documentation written by people), plus a BPE
tokenizer trained on it with HF ``tokenizers``.

Deterministic for a given Python version: modules are read in sorted order.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path
from typing import List

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from crnet_megatron.data.safe_files import claim, replace_into, temporary_path

EOS = "<|endoftext|>"


def _docstrings(path: Path) -> List[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 200:
                letters = sum(c.isalpha() or c.isspace() for c in doc)
                if letters / len(doc) > 0.85:
                    out.append(doc)
    return out


def builtin_corpus(max_chars: int = 2_000_000) -> List[str]:
    """Documents (docstrings) from the stdlib, up to ``max_chars`` characters in all."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).parts
        if rel[0] in ("site-packages", "test", "idlelib", "lib2to3", "tkinter") or "tests" in rel:
            continue
        for doc in _docstrings(path):
            docs.append(doc)
            total += len(doc)
            if total >= max_chars:
                return docs
    if not docs:
        raise RuntimeError(f"no docstrings found under the Python stdlib at {stdlib}")
    return docs


def train_tokenizer(docs: List[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with an end-of-document token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def load_or_train_tokenizer(docs: List[str], vocab_size: int, cache_dir: str) -> Tokenizer:
    path = os.path.join(cache_dir, f"builtin_bpe_{vocab_size}.json")
    if os.path.exists(path):
        return Tokenizer.from_file(path)
    tok = train_tokenizer(docs, vocab_size)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = temporary_path(path)
    claim(tmp)  # a fresh name created here: tokenizers never writes through a planted link
    try:
        tok.save(tmp)
        replace_into(tmp, path, "tokenizer")
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tok
