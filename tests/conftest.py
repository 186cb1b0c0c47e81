import os
import warnings

import pytest

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def megatron_single():
    """Single-process gloo group with TP=PP=1 (Megatron modules need parallel_state)."""
    from crnet_megatron.parallel.groups import destroy_distributed, init_distributed
    from tests.helpers import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    init_distributed(1, 1, seed=1234)
    yield
    destroy_distributed()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small real-English jsonl (stdlib docstrings), a BPE-512 tokenizer, and its indexed
    dataset: (prefix, tokenizer_path, jsonl_path)."""
    import json

    from crnet_megatron.data.corpus import builtin_corpus, train_tokenizer
    from crnet_megatron.data.preprocess import preprocess_jsonl

    root = tmp_path_factory.mktemp("tiny_data")
    docs = builtin_corpus(max_chars=150_000)
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = train_tokenizer(docs, 512)
    tok_path = str(root / "tokenizer.json")
    tok.save(tok_path)
    prefix = preprocess_jsonl([str(jsonl)], str(root / "docs"), tok_path, ["text"],
                              append_eod=True, progress=False)["text"]
    return prefix, tok_path, str(jsonl)


@pytest.fixture(scope="session")
def saved_checkpoint(tiny_dataset, tmp_path_factory):
    """One checkpoint of the tiny driver run (iteration 2); tests copy it before changing it."""
    from crnet_megatron.checkpoint.resume import iteration_dir
    from tests.driver_utils import driver_cfg, run_in_process

    root = tmp_path_factory.mktemp("saved")
    run_in_process(driver_cfg(tiny_dataset, root / "c", root / "s", "schedule.train_iters=2",
                              "checkpoint.save_interval=2"))
    return iteration_dir(str(root / "s"), 2)
