"""The command-line tools: calculator numbers, preprocessing CLI, metrics plot."""

import json
import subprocess
import sys

from crnet_megatron.data.preprocess import HFTokenizer, read_documents


def _tool(*args, cwd="."):
    return subprocess.run([sys.executable, *args], cwd=cwd, check=True, capture_output=True,
                          text=True, timeout=300)


def test_param_calculator_json(tmp_path):
    out = tmp_path / "p.json"
    _tool("-m", "crnet_megatron.cli.params", "--size", "1b", "7b", "--rank", "448", "512",
          "--json", str(out))
    rows = {(r["size"], r["rank"]): r for r in json.loads(out.read_text())}
    assert round(rows[("1b", 448)]["params"] / 1e6, 1) == 582.4
    assert round(rows[("7b", 512)]["params"] / 1e6, 1) == 1704.1
    assert round(rows[("1b", 448)]["dense_params"] / 1e6, 1) == 1339.1


def test_preprocess_cli_trains_a_tokenizer(tiny_dataset, tmp_path):
    _, _, jsonl = tiny_dataset
    tok = tmp_path / "tok.json"
    _tool("-m", "crnet_megatron.cli.preprocess", "--input", jsonl, "--output-prefix", str(tmp_path / "d"),
          "--vocab-size", "300", "--tokenizer-out", str(tok), "--append-eod", "--workers", "2")
    docs = read_documents(str(tmp_path / "d_text_document"))
    t = HFTokenizer(str(tok))
    first = json.loads(open(jsonl).readline())["text"]
    assert t.vocab_size == 300 and docs[0].tolist() == t.tokenize(first) + [t.eod]


def test_plot_metrics(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        dict(split="train", iteration=1, loss=5.0, ppl=148.4),
        dict(split="train", iteration=2, loss=4.0, ppl=54.6),
        dict(split="valid", iteration=2, loss=4.2, ppl=66.7)]))
    _tool("-m", "crnet_megatron.cli.plot", str(path), "--out", str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_throughput_reduced(tmp_path, monkeypatch):
    """The benchmark's CI mode: every section and variant is measured and the table is
    well formed (baselines at ratio 1, positive times, FLOP ratios where stated)."""
    import json

    from crnet_megatron.bench import throughput as bench_throughput

    monkeypatch.delenv("MASTER_PORT", raising=False)
    out = tmp_path / "bench.json"
    bench_throughput.main(["--reduced", "--json", str(out)])
    data = json.load(open(out))
    assert data["reduced"] and data["repeats"] == 2
    rows = {(r["section"], r["variant"]): r for r in data["rows"]}
    expected = {("projections", v) for v in ("plain", "crnet", "dense")} | \
        {("layer", v) for v in ("crnet", "dense")} | {("step", v) for v in ("crnet/none", "dense")} | \
        {("step recompute", f"crnet/{m}") for m in ("none", "crnet", "full", "selective")}
    assert expected <= set(rows)
    for r in data["rows"]:
        assert 0 < r["min_ms"] <= r["median_ms"]
        if r["variant"] == r["vs"]:
            assert r["ratio"] == 1.0
    assert 0 < rows[("step", "crnet/none")]["flop_ratio"] < 1
    assert data["flush_denormal"] is True and data["step_warmup"] == 1
    assert all(isinstance(r["subnormals"], int) and r["subnormals"] >= 0
               for r in data["rows"] if r["section"].startswith("step"))


def test_bench_runner_interleaves_and_tabulates(tmp_path, capsys):
    """The one runner every benchmark uses: warm-up, then every variant once per repeat in turn;
    ratios of minima to the baseline; one Markdown table; the JSON the benchmark asked for."""
    from types import SimpleNamespace

    from crnet_megatron.bench import runner

    calls = []
    times = runner.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                               warmup=1, repeats=3)
    assert calls == ["a", "b"] * 4 and [len(v) for v in times.values()] == [3, 3]
    rows = runner.timing_rows({"a": [2.0, 1.0], "b": [4.0, 3.0]}, "a", section="s")
    assert [(r["variant"], r["ratio"], r["min_ms"], r["median_ms"]) for r in rows] == \
        [("a", 1.0, 1000.0, 1500.0), ("b", 3.0, 3000.0, 3500.0)]
    text = runner.table(rows, [("variant", "variant", ""), ("ratio", "ratio", ".2f"),
                               ("none", "missing", ".1f")], "T")
    assert text.splitlines() == ["## T", "", "| variant | ratio | none |", "|---|---|---|",
                                 "| a | 1.00 | - |", "| b | 3.00 | - |"]
    out = tmp_path / "b.json"
    runner.finish(SimpleNamespace(json=str(out)), [text], rows=rows)
    assert json.loads(out.read_text())["rows"][1]["ratio"] == 3.0
    assert capsys.readouterr().out.startswith("## T")


def test_bench_command_lists_and_refuses(capsys):
    from crnet_megatron.cli import bench

    assert bench.main([]) == 0 and "weak-scaling" in capsys.readouterr().out
    assert bench.main(["nope"]) == 2 and "unknown benchmark 'nope'" in capsys.readouterr().err
