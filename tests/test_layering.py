"""The package's architecture, enforced: each wing imports only the wings below it
(``crnet_megatron.LAYERS``), the light entry points load nothing heavy, and the facts that must
be restated (the test oracle, the self-contained export file) agree with the one table."""

import ast
import pathlib
import subprocess
import sys

import pytest

import crnet_megatron

pytestmark = pytest.mark.quick  # python -m pytest -m quick: a first check

PACKAGE = pathlib.Path(crnet_megatron.__file__).parent


def _imports(module: str, source: str):
    """(line, imported module) for every import of the package in ``source``."""
    is_pkg = module.endswith(".__init__")
    parts = module.split(".")[:-1] if is_pkg else module.split(".")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[:len(parts) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from crnet_megatron.x import y" is x's wing; "from crnet_megatron import x", x's
            names = [target] if _wing(target) else [f"{target}.{a.name}" for a in node.names]
            for name in names:
                if name.startswith("crnet_megatron."):
                    yield node.lineno, name
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("crnet_megatron."):
                    yield node.lineno, a.name


def _wing(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in crnet_megatron.LAYERS) \
        else None


def layering_violations(sources):
    """Upward imports among ``{module name: source}``, one readable line each."""
    order = {w: i for i, w in enumerate(crnet_megatron.LAYERS)}
    out = []
    for module, source in sources.items():
        wing = _wing(module)
        if wing is None:
            continue
        for line, target in _imports(module, source):
            other = _wing(target)
            if other is not None and order[other] > order[wing]:
                out.append(f"{module}:{line} imports {target}: the {wing} wing may import only "
                           f"wings below it ({', '.join(crnet_megatron.LAYERS[:order[wing]])})")
    return out


def _package_sources():
    sources = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        sources[".".join(rel.parts)] = path.read_text()
    return sources


def test_every_module_is_in_a_wing():
    stray = [m for m in _package_sources() if _wing(m) is None and m != "crnet_megatron.__init__"]
    assert not stray, f"modules outside the wings {crnet_megatron.LAYERS}: {stray}"
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == \
        set(crnet_megatron.LAYERS)


def test_no_wing_imports_a_wing_above_it():
    assert layering_violations(_package_sources()) == []


def test_a_planted_upward_import_fails_with_both_names():
    sources = _package_sources()
    sources["crnet_megatron.model.linears"] += "\nfrom crnet_megatron.training import trainer\n"
    sources["crnet_megatron.parallel.pipeline"] += "\ndef f():\n    from ..export import hf\n"
    found = layering_violations(sources)
    assert len(found) == 2
    assert "crnet_megatron.model.linears" in found[0] and "crnet_megatron.training" in found[0]
    assert "crnet_megatron.parallel.pipeline" in found[1] and "crnet_megatron.export" in found[1]


def _loaded_after(code: str):
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted("
                          "m for m in sys.modules if m in ('torch', 'megatron.core'))))"],
                         capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("code,absent", [
    ("import crnet_megatron", {"torch", "megatron.core"}),
    ("import crnet_megatron.planner.search, crnet_megatron.planner.published, "
     "crnet_megatron.model.positions, crnet_megatron.cli.plan", {"torch", "megatron.core"}),
    ("import crnet_megatron.config.run_config; "
     "crnet_megatron.config.run_config.load_run_config(None)", {"torch", "megatron.core"}),
    ("import crnet_megatron.export.modeling_crnet", {"megatron.core"}),
])
def test_light_entry_points_load_nothing_heavy(code, absent):
    assert not (_loaded_after(code) & absent)


def test_a_planted_heavy_import_is_seen():
    assert _loaded_after("import crnet_megatron.model.positions\nimport megatron.core") >= \
        {"torch", "megatron.core"}


def test_restated_positions_agree_with_the_table():
    from crnet_megatron.export import modeling_crnet
    from crnet_megatron.model import positions
    from tests import reference

    assert reference.POSITIONS == positions.NAMES
    assert modeling_crnet.PROJECTIONS == tuple(p.hf_name for p in positions.POSITIONS)


def test_te_range_is_stated_once():
    """The tested Transformer Engine range lives in ``parallel.environment``: the Docker build and
    the self-test call it, and README quotes it."""
    import pathlib

    from crnet_megatron.parallel.environment import TE_TESTED_RANGE, te_range_problem

    low, high = TE_TESTED_RANGE
    assert te_range_problem(f"{low}.0") is None and te_range_problem(f"{high}.0") is not None
    assert te_range_problem("-") is not None  # the Docker image must carry TE
    root = pathlib.Path(__file__).parents[1]
    assert f"[{low}, {high})" in (root / "README.md").read_text()
    dockerfile = (root / "docker" / "Dockerfile").read_text()
    assert "te_range_problem" in dockerfile and low not in dockerfile


def test_export_reads_checkpoints_without_the_training_driver():
    """``crnet-export`` and ``crnet-eval`` load no module of ``training/``: checkpoints are read
    through ``checkpoint/``, the run config through ``config/``, micro-batches and the schedule
    through ``data/`` and ``parallel/``."""
    sources = _package_sources()
    upward = [(m, t) for m, s in sources.items() if _wing(m) == "export"
              for _, t in _imports(m, s) if _wing(t) == "training"]
    assert upward == []
    loaded = subprocess.run([sys.executable, "-c", (
        "import sys, crnet_megatron.cli.export, crnet_megatron.cli.evaluate, "
        "crnet_megatron.export.hf, crnet_megatron.export.loader, crnet_megatron.export.perplexity"
        "\nprint(' '.join(m for m in sys.modules if m.startswith('crnet_megatron.')))")],
        capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert "crnet_megatron.checkpoint.resume" in loaded or "crnet_megatron.export.loader" in loaded
    assert not [m for m in loaded if m.startswith("crnet_megatron.training")], loaded
