"""preprocess -> indexed dataset -> GPTDataset batches round-trips a small jsonl exactly; bad
data inputs give one clear error and write nothing."""

import json
import os

import numpy as np
import pytest

from crnet_megatron.data.preprocess import HFTokenizer, preprocess_jsonl, read_documents


def test_preprocess_round_trip(tiny_dataset, tmp_path):
    prefix, tok_path, jsonl = tiny_dataset
    tok = HFTokenizer(tok_path)
    texts = [json.loads(line)["text"] for line in open(jsonl)]
    docs = read_documents(prefix)
    assert len(docs) == len(texts)
    for text, ids in zip(texts, docs):
        assert ids.tolist() == tok.tokenize(text) + [tok.eod]
        assert tok.detokenize(ids[:-1]) == text


def test_workers_give_the_same_files(tiny_dataset, tmp_path):
    _, tok_path, jsonl = tiny_dataset
    one = preprocess_jsonl([jsonl], str(tmp_path / "one"), tok_path, append_eod=True,
                           workers=1, progress=False)["text"]
    two = preprocess_jsonl([jsonl], str(tmp_path / "two"), tok_path, append_eod=True,
                           workers=2, progress=False)["text"]
    for ext in (".bin", ".idx"):
        assert open(one + ext, "rb").read() == open(two + ext, "rb").read()


def test_gpt_dataset_batches_are_windows_of_the_document_stream(megatron_single, tiny_dataset,
                                                               tmp_path):
    """Every training sample (seq+1 tokens) is the window at k*seq of the documents joined in
    the dataset's document order, and the samples tile that stream."""
    from crnet_megatron.config.run_config import load_run_config
    from crnet_megatron.training.data import build_datasets

    prefix, tok_path, _ = tiny_dataset
    seq = 32
    cfg = load_run_config(None, [f"model.seq_length={seq}", "data.split=100,0,0",
                                 f"data.cache_dir={tmp_path}"])
    train, _, _ = build_datasets(cfg, HFTokenizer(tok_path), [prefix], None, [50, 0, 0])
    ds = train  # one prefix, no weights: the GPTDataset itself
    docs = read_documents(prefix)
    stream = np.concatenate([docs[i] for i in ds.document_index])
    starts = set()
    for i in range(len(ds)):
        s = ds[i]
        window = np.concatenate([s["tokens"].numpy(), s["labels"].numpy()[-1:]])
        k = int(ds.shuffle_index[i])
        assert np.array_equal(window, stream[k * seq: k * seq + seq + 1]), i
        starts.add(k)
    assert starts == set(range(len(ds)))


def test_missing_and_bad_inputs(tiny_dataset, tmp_path):
    _, tok_path, jsonl = tiny_dataset
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        preprocess_jsonl([str(tmp_path / "nope.jsonl")], str(tmp_path / "x"), tok_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no string field 'text'"):
        preprocess_jsonl([str(bad)], str(tmp_path / "bad"), tok_path, progress=False)
    assert not list(tmp_path.glob("bad_text_document*"))  # nothing half-written
    out = preprocess_jsonl([jsonl], str(tmp_path / "keep"), tok_path, progress=False)["text"]
    before = open(out + ".bin", "rb").read()
    with pytest.raises(FileExistsError, match="overwrite"):
        preprocess_jsonl([jsonl], str(tmp_path / "keep"), tok_path, progress=False)
    assert open(out + ".bin", "rb").read() == before


def test_missing_prefix_and_corrupt_index(tiny_dataset, tmp_path):
    from crnet_megatron.data.validate import read_index as check_prefix

    prefix, _, _ = tiny_dataset
    with pytest.raises(FileNotFoundError, match=r"data prefix '.*missing'.*does not exist"):
        check_prefix(str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    for ext in (".bin", ".idx"):
        (tmp_path / f"broken{ext}").write_bytes(open(prefix + ext, "rb").read())
    with open(str(broken) + ".idx", "r+b") as f:
        f.write(b"GARBAGE!!")
    with pytest.raises(ValueError, match="not a Megatron index file"):
        check_prefix(str(broken))


def test_a_fifo_named_npy_in_the_index_cache_is_refused_not_waited_on(tmp_path):
    """A FIFO named ``*.npy`` in ``index_cache/`` made start-up hang with no output (its header
    was read with a plain open): refused at once, one line naming it."""
    import subprocess
    import sys

    cache = tmp_path / "index_cache"
    cache.mkdir()
    os.mkfifo(cache / "abc-GPTDataset-train-document_index.npy")
    code = ("from crnet_megatron.data.index_cache import check_index_cache\n"
            f"try:\n    check_index_cache({str(tmp_path)!r}, repair=True)\n"
            "except ValueError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60).stdout
    assert "dataset index cache " in out and "abc-GPTDataset-train-document_index.npy is not a " \
        "regular file" in out
