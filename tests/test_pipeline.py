"""The pipeline declaration: code versions from import closures, canonical params, a torch-free DAG."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmforge import imports, pipeline
from lmforge.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny.yaml"


@pytest.fixture
def lib_copy(tmp_path, monkeypatch):
    """The library's sources copied to a temp folder that lmforge.imports reads instead."""
    root = tmp_path / "lmforge"
    shutil.copytree(imports.LIB_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(imports, "LIB_ROOT", root)
    for cached in (imports._files, imports.imports_of, imports._source_digest):
        cached.cache_clear()
    yield root
    for cached in (imports._files, imports.imports_of, imports._source_digest):
        cached.cache_clear()


@pytest.mark.parametrize("stage", list(pipeline.STAGES))
def test_a_stage_code_version_follows_exactly_the_files_it_can_load(stage, lib_copy):
    closure = set(imports.closure(pipeline.STAGES[stage].module, *pipeline.LAUNCHER))
    before = pipeline.stage_code_version(stage)
    for module in imports.all_modules():
        path = imports.module_file(module)
        original = path.read_text()
        path.write_text(original + "\n# an edit\n")
        imports._source_digest.cache_clear()
        changed = pipeline.stage_code_version(stage) != before
        path.write_text(original)
        imports._source_digest.cache_clear()
        assert changed == (module in closure), f"editing {module} {'left' if not changed else 'changed'} {stage}"
    assert pipeline.stage_code_version(stage) == before


def test_closures_hold_what_each_stage_imports_and_nothing_it_does_not():
    dpo = imports.closure("lmforge.stages.dpo", *pipeline.LAUNCHER)
    # The pairs DPO trains on are built by the reward stage's data code: it is part of DPO's code.
    assert {"lmforge.train.dpo", "lmforge.train.loop", "lmforge.device", "lmforge.workflow",
            "lmforge.distributed", "lmforge.data.sources", "lmforge"} <= set(dpo)
    pretrain = imports.closure("lmforge.stages.pretrain", *pipeline.LAUNCHER)
    assert {"lmforge.device", "lmforge.config", "lmforge.tokenizer", "lmforge.train.loop"} <= set(pretrain)
    assert not {"lmforge.cli", "lmforge.report", "lmforge.train.ppo", "lmforge.stages.sft"} & set(pretrain)


# One interpreter imports torch and the other heavy libraries once, then forks a child per stage that
# imports the stage module and the rule's entry point and lists the lmforge modules it has loaded.
_LOADED_PER_STAGE = """
import json, os, sys
import torch, numpy, yaml  # loaded before forking: shared by every child
names = sys.argv[1:]
found = {}
for name in names:
    read, write = os.pipe()
    if os.fork() == 0:
        __import__(f"lmforge.stages.{name}"), __import__("lmforge.workflow")
        os.write(write, " ".join(m for m in sys.modules if m.split(".")[0] == "lmforge").encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        found[name] = f.read().split()
    os.wait()
print(json.dumps(found))
"""


@pytest.mark.integration  # a fresh interpreter
def test_the_closure_covers_every_module_python_loads_for_each_stage():
    # Everything importing a stage (and the rule's entry point) loads must be in its code version;
    # function-local imports add to that, never remove.
    proc = subprocess.run([sys.executable, "-c", _LOADED_PER_STAGE, *pipeline.STAGES], capture_output=True,
                          text=True, check=True)
    for stage, loaded in json.loads(proc.stdout).items():
        assert loaded, stage
        missing = set(loaded) - set(imports.closure(pipeline.STAGES[stage].module, *pipeline.LAUNCHER))
        assert not missing, f"{stage} loads {sorted(missing)} outside its code closure"


def _reordered(value):
    """The same config with every mapping's keys in reverse order (as a YAML tool that sorts might write it)."""
    if isinstance(value, dict):
        return {k: _reordered(value[k]) for k in reversed(list(value))}
    return value


def test_params_are_canonical(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    reordered = tmp_path / "reordered.yaml"
    reordered.write_text(yaml.safe_dump(_reordered(raw), sort_keys=False))
    a, b = load_config(TINY), load_config(reordered)
    assert list(a) != list(b)
    for stage in pipeline.STAGES:
        assert repr(pipeline.stage_params(stage, a)) == repr(pipeline.stage_params(stage, b)), stage
    changed = load_config(TINY, {"dpo.beta": 0.25})
    assert [s for s in pipeline.STAGES
            if pipeline.stage_params(s, changed) != pipeline.stage_params(s, a)] == ["dpo"]


def test_inputs_and_outputs_follow_the_config(tmp_path):
    config = load_config(TINY)
    assert "config" in pipeline.stage_outputs("tokenizer")  # tokenizer_config.json is an output too
    assert pipeline.stage_inputs("dpo", config) == {"policy": "results/sft/model.pt"}
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    config = load_config(TINY, {"dpo.data": str(prefs), "dpo.on_policy": True, "eval.stages": ["pretrain", "dpo"]})
    assert pipeline.stage_inputs("dpo", config, "results/seeds/3/") == {
        "policy": "results/seeds/3/results/sft/model.pt", "data": str(prefs),
        "pairs": "results/seeds/3/results/scored/pairs.jsonl"}
    assert {"model_pretrain", "model_dpo", "reward_model", "val", "meta"} == set(pipeline.stage_inputs("evaluate", config))


@pytest.mark.integration  # a fresh interpreter
def test_building_the_dag_imports_no_torch():
    code = ("import sys; from lmforge.config import load_config; from lmforge import pipeline; "
            "c = load_config('config/config.yaml'); "
            "[(pipeline.stage_params(s, c), pipeline.stage_inputs(s, c)) for s in pipeline.STAGES]; "
            "heavy = sorted(m for m in ('torch', 'mlflow', 'datasets', 'pandas') if m in sys.modules); "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_seeds_are_copies_of_the_pipeline_under_their_own_folder():
    config = load_config(TINY, {"seeds": [3, 4]})
    copies = pipeline.instances(config)
    assert [(r, p) for r, p, _ in copies] == [("", ""), ("seed3_", "results/seeds/3/"), ("seed4_", "results/seeds/4/")]
    assert pipeline.stage_params("pretrain", copies[1][2])["seed"] == 3
    assert pipeline.stage_of_rule("seed3_pretrain") == "pretrain" and pipeline.stage_of_rule("evaluate") == "evaluate"
