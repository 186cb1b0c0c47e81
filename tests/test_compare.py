"""crnet-compare: a used --out is refused before anything trains (its runs would be resumed with
other settings); a run reports progress per variant and draws the variants' loss curves."""

import pytest

from tests.driver_utils import TINY


def _sets(tiny_dataset, tmp_path):
    prefix, tok, _ = tiny_dataset
    sets = TINY + [f"data.data_path=[{prefix}]", f"data.tokenizer={tok}",
                   f"data.cache_dir={tmp_path / 'cache'}", "schedule.train_iters=2",
                   "eval.eval_interval=2", "eval.eval_iters=1", "logging.log_interval=1"]
    return [a for s in sets for a in ("--set", s)]


def test_used_out_is_refused_unless_overwrite(tmp_path, capsys):
    from crnet_megatron.cli.compare import main

    out = tmp_path / "out"
    (out / "crnet").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        main(["examples/configs/tiny_cpu.yaml", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty" in err[0] and "--overwrite" in err[0]
    assert (out / "crnet").is_dir()  # nothing removed


def test_compare_reports_progress_and_plots(tiny_dataset, tmp_path, capsys, monkeypatch):
    from crnet_megatron.cli.compare import main

    monkeypatch.delenv("MASTER_PORT", raising=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier comparison")
    assert main(["examples/configs/tiny_cpu.yaml", "--out", str(out), "--overwrite",
                 "--variants", "crnet", "dense", *_sets(tiny_dataset, tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "[1/2] crnet: training 2 iterations" in text and "[2/2] dense: done in" in text
    assert not (out / "stale.txt").exists()
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [ln for ln in text.splitlines() if ln.startswith("| crnet |") or ln.startswith("| dense |")]
    assert len(rows) == 2
