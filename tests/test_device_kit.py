"""The device kit in CPU mode (tiny shapes, the fast self-test checks), so it cannot rot: it
writes the self-test and device-benchmark tables as JSON and Markdown, every check passes, and
every variant is measured."""

import json
import os
import subprocess
import sys


def test_device_kit_cpu_mode(tmp_path):
    out = tmp_path / "kit"
    env = dict(os.environ, PYTHON=sys.executable, TMPDIR=str(tmp_path))
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(["bash", "tools/device_kit.sh", str(out), "--cpu"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    checks = {r["check"]: r["status"] for r in json.load(open(out / "selftest.json"))["checks"]}
    assert checks == {"versions": "pass", "bf16_vs_fp32": "pass", "export_round_trip": "pass",
                      "gemm_nccl_sniff": "pass"}
    device = json.load(open(out / "device.json"))
    assert device["reduced"] and device["device"] == "CPU"
    rows = {r["variant"]: r for r in device["rows"]}
    assert set(rows) == {"crnet", "crnet+alg1", "lowrank", "dense"}
    assert all(r["min_ms"] > 0 and r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["crnet"]["params"] < rows["dense"]["params"]
    assert rows["dense"]["vs_dense"] == 1.0
    for name in ("selftest.md", "device.md"):
        assert "|---|" in (out / name).read_text()
