"""The launch scripts work as a cluster runs them: sbatch scripts executed from a copy in
another directory (slurmd's spool) under stand-ins for srun/scontrol, torchrun scripts under a
stand-in torchrun; in dry-run mode each rank prints what it would run. Checked: world size,
TP x PP x DP = GPUs, the config path, the master address, the chained script found, the
environment Megatron needs. ``bash -n`` and (where installed) ``shellcheck`` pass."""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(f"{ROOT}/examples/slurm/*.sbatch") + glob.glob(f"{ROOT}/examples/torchrun/*.sh"))

# Stand-ins: run the task command for the first and the last rank only (enough to check the
# layout arithmetic without starting 32 interpreters).
FAKE_SRUN = """#!/bin/bash
echo "$@" >> "${SRUN_LOG:-/dev/null}"
while [[ $# -gt 0 && "$1" == --* ]]; do shift; done
n=$SLURM_NTASKS; per=$SLURM_NTASKS_PER_NODE
for r in 0 $((n - 1)); do
  SLURM_STEP_ID=0 SLURM_STEP_NUM_TASKS=$n SLURM_PROCID=$r SLURM_LOCALID=$((r % per)) \
    SLURM_NODEID=$((r / per)) "$@" || exit $?
done
"""
FAKE_SCONTROL = """#!/bin/bash
[[ "$1 $2" == "show hostnames" ]] || exit 1
for i in $(seq 1 "$SLURM_NNODES"); do printf 'gpu-node%03d\\n' "$i"; done
"""
FAKE_TORCHRUN = """#!/bin/bash
n=1; args=()
while [[ $# -gt 0 ]]; do
  case "$1" in --nproc-per-node) n=$2; shift 2;; --standalone) shift;; *) args+=("$1"); shift;; esac
done
for r in 0 $((n - 1)); do RANK=$r LOCAL_RANK=$r WORLD_SIZE=$n "$PYTHON" "${args[@]}" || exit $?; done
"""


def _bin(tmp_path):
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("torchrun", FAKE_TORCHRUN)):
        (d / name).write_text(text)
        (d / name).chmod(0o755)
    (d / "python").write_text(f'#!/bin/bash\nexec "{sys.executable}" "$@"\n')
    (d / "python").chmod(0o755)
    return d


def _run(script, tmp_path, env_extra, args=()):
    env = {k: v for k, v in os.environ.items() if not k.startswith((
        "SLURM_", "SRUN_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS"))}
    env.update(PATH=f"{_bin(tmp_path)}:{env['PATH']}", PYTHON=sys.executable, DRY_RUN="1",
               PYTHONPATH=ROOT)
    env.update(env_extra)
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=str(tmp_path))


def _data_args(tiny_dataset):
    """--dry-run checks that the data and tokenizer are readable: point the configs at real ones."""
    prefix, tok, _ = tiny_dataset
    return ["--set", f"data.data_path=[{prefix}]", "--set", f"data.tokenizer={tok}"]


def _ranks(out):
    rows = [dict(kv.split("=", 1) for kv in line.split() if "=" in kv and not kv.startswith("--"))
            for line in out.splitlines() if line.startswith("dry-run ")]
    assert rows, out
    return rows


@pytest.mark.parametrize("name,tp,pp,vpp", [("pretrain_llama2_7b.sbatch", 2, 1, 1),
                                            ("pretrain_llama2_7b_interleaved.sbatch", 2, 4, 2)])
def test_sbatch_runs_from_the_spool_directory(tmp_path, name, tp, pp, vpp, tiny_dataset):
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(f"{ROOT}/examples/slurm/{name}", spool / "slurm_script")  # what slurmd runs
    nodes, per = 4, 8
    res = _run(spool / "slurm_script", tmp_path, dict(
        SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_NODELIST="gpu-node[001-004]", SLURM_NNODES=str(nodes),
        SLURM_NTASKS=str(nodes * per), SLURM_NTASKS_PER_NODE=str(per), SLURM_JOB_ID="42"),
        _data_args(tiny_dataset))
    assert res.returncode == 0, res.stderr[-2000:]
    rows = _ranks(res.stdout)
    assert [r["rank"] for r in rows] == ["0", str(nodes * per - 1)]
    assert [r["local_rank"] for r in rows] == ["0", str(per - 1)]
    for r in rows:
        assert r["world"] == str(nodes * per)
        assert (int(r["tp"]), int(r["pp"]), int(r["vpp"])) == (tp, pp, vpp)
        assert int(r["tp"]) * int(r["pp"]) * int(r["dp"]) == nodes * per
        assert r["master"] == f"gpu-node001:{20000 + 42}"  # derived from SLURM_JOB_ID
        assert r["config"] == "examples/configs/llama2_7b_c4_seq256.yaml"
        assert r["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    if vpp > 1:
        assert "checkpoint.save=runs/llama2_7b_interleaved" in res.stdout
        assert int(rows[0]["micro_batches"]) % pp == 0


def test_sbatch_without_repository_says_what_to_set(tmp_path):
    env = dict(SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_NODELIST="n1", SLURM_NNODES="1",
               SLURM_NTASKS="8", SLURM_NTASKS_PER_NODE="8")
    res = _run(f"{ROOT}/examples/slurm/pretrain_llama2_7b_interleaved.sbatch", tmp_path, env)
    assert res.returncode == 2 and "submit from the repository root or set CRNET_ROOT" in res.stderr


@pytest.mark.parametrize("image", ["", "/shared/crnet.sqsh"], ids=["bare", "pyxis"])
def test_sbatch_container_is_optional(tmp_path, tiny_dataset, image):
    """No IMAGE: srun runs the ``python`` on PATH (bare: venv, conda, modules). IMAGE: pyxis's
    options, the repository mounted at its own path. Either way: the CPUs per task reach srun
    (Slurm >= 22.05 no longer passes them on) and a requeued job appends to its log."""
    log = tmp_path / "srun.log"
    env = dict(SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_NODELIST="n[1-2]", SLURM_NNODES="2",
               SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_ID="7",
               SLURM_CPUS_PER_TASK="6", SRUN_LOG=str(log), IMAGE=image, TP="1")
    res = _run(f"{ROOT}/examples/slurm/pretrain_llama2_7b.sbatch", tmp_path, env,
               _data_args(tiny_dataset))
    assert res.returncode == 0, res.stderr[-2000:]
    srun_args = log.read_text()
    if image:
        assert f"--container-image={image}" in srun_args
        assert f"--container-mounts={ROOT}:{ROOT}" in srun_args
    else:
        assert "--container" not in srun_args
    assert "python -m crnet_megatron.cli.train" in srun_args
    assert {r["OMP_NUM_THREADS"] for r in _ranks(res.stdout)} == {"6"}
    assert {r["SRUN_CPUS_PER_TASK"] for r in _ranks(res.stdout)} == {"6"}
    for script in ("pretrain_llama2_7b.sbatch", "pretrain_llama2_7b_interleaved.sbatch"):
        assert "#SBATCH --open-mode=append" in open(f"{ROOT}/examples/slurm/{script}").read()


@pytest.mark.parametrize("script", sorted(glob.glob(f"{ROOT}/examples/torchrun/*.sh")),
                         ids=os.path.basename)
def test_torchrun_scripts(tmp_path, script, tiny_dataset):
    res = _run(script, tmp_path, {}, _data_args(tiny_dataset))
    assert res.returncode == 0, res.stderr[-2000:]
    rows = _ranks(res.stdout)
    n = int(re.search(r"--nproc-per-node (\d+)", open(script).read()).group(1))
    config = re.search(r"examples/configs/[\w.]+\.yaml", open(script).read()).group(0)
    for r in rows:
        assert r["world"] == str(n) and int(r["tp"]) * int(r["pp"]) * int(r["dp"]) == n
        assert r["config"] == config and r["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_scripts_pass_bash_n_and_shellcheck(script):
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    res = subprocess.run(["shellcheck", "-s", "bash", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def _launch_env(monkeypatch, **env):
    for key in [k for k in os.environ if k.startswith(("SLURM_", "RANK", "WORLD_SIZE",
                                                       "LOCAL_RANK"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_ranks_come_from_slurm_only_inside_a_job_step(monkeypatch, capsys):
    """A trainer started in an allocation without srun (an salloc shell, a batch script's own
    line) sees SLURM_NTASKS but no step: one process, and a note saying so, instead of waiting
    10 minutes for ranks that never come. Inside a step: the step's tasks."""
    from crnet_megatron.parallel import launch

    _launch_env(monkeypatch, SLURM_JOB_ID="9", SLURM_NTASKS="4", SLURM_PROCID="0")
    monkeypatch.setattr(launch, "_NOTED", False)
    assert launch.world_size() == 1 and "RANK" not in os.environ
    assert "not in a job step: running as one process; start it with srun to use all 4" in \
        capsys.readouterr().err
    _launch_env(monkeypatch, SLURM_JOB_ID="9", SLURM_NTASKS="4", SLURM_STEP_ID="0",
                SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1", SLURM_LOCALID="1")
    assert launch.world_size() == 2
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"]) == ("1", "1")


def test_a_master_port_in_use_is_one_line(tmp_path, tiny_dataset):
    """Rank 0 of a multi-process launch whose MASTER_PORT is taken (another job on the node)
    stops at once with one line naming the port, not a traceback."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
        env.update(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        prefix, tok, _ = tiny_dataset
        res = subprocess.run(
            [sys.executable, "-m", "crnet_megatron.cli.train", f"{ROOT}/examples/configs/"
             "tiny_cpu.yaml", "--set", f"data.data_path=[{prefix}]", "--set",
             f"data.tokenizer={tok}", "--set", "checkpoint.save=null", "--set",
             f"data.cache_dir={tmp_path}", "--set", "schedule.global_batch_size=16"],
            env=env, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    errors = [line for line in res.stderr.splitlines() if line.startswith("crnet-train: error")]
    assert res.returncode != 0 and len(errors) == 1, res.stderr[-2000:]
    assert f"MASTER_PORT={port} on MASTER_ADDR=127.0.0.1 is already in use" in errors[0]
    assert "Traceback" not in res.stderr


def _run_id_worker(rank, world):
    from crnet_megatron.parallel.groups import init_distributed, run_id_from_rank0

    init_distributed()
    return run_id_from_rank0(f"{rank + 1:02x}" * 16)


def test_every_rank_takes_rank0s_run_id():
    """One run id per run (each rank drew its own, and every multi-rank save then warned that
    the common state differs): rank 0's reaches every rank."""
    from tests.helpers import run_distributed

    assert run_distributed(_run_id_worker, 2, timeout=120) == ["01" * 16] * 2
