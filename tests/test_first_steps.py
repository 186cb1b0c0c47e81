"""A new user's first steps answer fast and name the problem: a config is required; --help and
config errors come before megatron-core is imported; YAML errors keep their line and column;
--dry-run and crnet-plan check every divisibility rule a real run checks; data, tokenizer and
save paths are checked before any process group; an HF tokenizer directory is accepted."""

import subprocess
import sys

import pytest

from crnet_megatron.config.run_config import load_run_config

pytestmark = pytest.mark.quick  # python -m pytest -m quick: a first check


def _run(code: str):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def _train_cli(args):
    """crnet-train in a fresh process; prints whether megatron-core was imported."""
    return _run("import sys\nfrom crnet_megatron.cli.train import main\ntry:\n"
                f"    main({args!r})\nexcept SystemExit as e:\n    code = e.code\nelse:\n"
                "    code = 0\nprint('megatron-imported', 'megatron.core' in sys.modules, code)")


def test_a_config_is_required():
    proc = _train_cli([])
    assert "the following arguments are required: config" in proc.stderr
    assert "megatron-imported False 2" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--help"], None),
    (["missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["examples/configs/tiny_cpu.yaml", "--set", "model.num_query_groups=3"],
     "model.num_attention_heads = 4 is not a multiple of model.num_query_groups = 3"),
    (["examples/configs/tiny_cpu.yaml", "--set", "data.data_path=[nowhere/x]", "--set",
      "data.tokenizer=nowhere/t.json"], "data.data_path: nowhere/x.bin does not exist"),
])
def test_help_and_config_errors_come_before_megatron(args, message):
    proc = _train_cli(args)
    assert proc.stdout.strip().splitlines()[-1].startswith("megatron-imported False")
    if message:
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and message in err[0], proc.stderr


def test_yaml_errors_keep_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_layers: 4\n  hidden_size: [128\n")
    with pytest.raises(ValueError, match=r"is not valid YAML at line 4, column 1"):
        load_run_config(str(path))


@pytest.mark.parametrize("sets,world,rule", [
    (["parallel.tensor_model_parallel_size=3"], 3,
     "model.num_attention_heads = 4 is not divisible by parallel.tensor_model_parallel_size = 3"),
    (["parallel.pipeline_model_parallel_size=3"], 3,
     "model.num_layers = 4 is not divisible by parallel.pipeline_model_parallel_size = 3"),
    (["schedule.global_batch_size=12"], 8, "schedule.global_batch_size = 12 is not divisible by "
                                           "schedule.micro_batch_size x data-parallel size"),
    (["parallel.tensor_model_parallel_size=2", "model.seq_length=127"], 2,
     "model.seq_length = 127 is not divisible by parallel.tensor_model_parallel_size = 2"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=4"],
     2, "the layers of each pipeline stage ([2, 2]) do not split into "
        "parallel.virtual_pipeline_model_parallel_size = 4 equal model chunks"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2",
      "schedule.micro_batch_size=4", "schedule.global_batch_size=12"], 2,
     "(micro_batch_size x data-parallel size) = 3 must be a multiple of 2"),
])
def test_dry_run_and_planner_name_the_broken_rule(sets, world, rule, capsys, monkeypatch):
    from crnet_megatron.cli.plan import main as plan_main
    from crnet_megatron.cli.train import main as train_main

    argv = ["examples/configs/tiny_cpu.yaml"] + [a for s in sets for a in ("--set", s)]
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as e:
        train_main(argv + ["--dry-run"])
    assert e.value.code == 2 and rule in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit) as e:
        plan_main(argv + ["--gpus", str(world)])
    assert e.value.code == 2 and rule in capsys.readouterr().err


def test_hf_tokenizer_directory_is_accepted(tiny_dataset, tmp_path):
    import shutil

    from crnet_megatron.data.preprocess import HFTokenizer

    hf_dir = tmp_path / "hf_tok"
    hf_dir.mkdir()
    shutil.copy(tiny_dataset[1], hf_dir / "tokenizer.json")
    assert HFTokenizer(str(hf_dir)).fingerprint() == HFTokenizer(tiny_dataset[1]).fingerprint()
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        HFTokenizer(str(tmp_path))


def test_preprocess_creates_its_directories_and_never_half_overwrites(tiny_dataset, tmp_path,
                                                                      capsys):
    from crnet_megatron.cli.preprocess import main

    _, _, jsonl = tiny_dataset
    argv = ["--input", jsonl, "--output-prefix", str(tmp_path / "new" / "d"), "--vocab-size",
            "300", "--tokenizer-out", str(tmp_path / "tok" / "t.json"), "--append-eod"]
    main(argv)  # neither directory existed
    capsys.readouterr()
    assert (tmp_path / "new" / "d_text_document.bin").is_file()
    tok = (tmp_path / "tok" / "t.json").read_bytes()
    with pytest.raises(SystemExit) as e:
        main(argv[:5] + ["400"] + argv[6:])  # a rerun with another vocabulary
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "nothing was written" in err[0]
    assert (tmp_path / "tok" / "t.json").read_bytes() == tok  # the tokenizer was kept
