"""The SLURM profile on a real one-node SLURM cluster started here (tests/slurm/start-slurm.sh).

The smoke chain tokenizer -> tokenize -> pretrain runs as three SLURM jobs and gives the results of a
local run; a job cancelled inside SLURM fails the run naming its rule, and the rerun resumes from the
training checkpoint. Per-rule resources come from the config's `resources:` section and changing them
reruns nothing. Without sbatch on PATH the SLURM profile stops with one readable message.
"""
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from lmforge.config import apply_schema
from lmforge.errors import LmforgeError
from lmforge.loader import read_checkpoint
from test_workflow import executed, write_config

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
START = REPO / "tests" / "slurm" / "start-slurm.sh"
SMOKE = ("tokenizer", "tokenize", "pretrain")
# The first status check 5 s after a submission, then every 15, 25, ... s (the plugin adds 10 s
# each time nothing finished): short jobs are seen soon without polling squeue every second.
SLURM_ARGS = ("--profile", str(REPO / "profiles" / "slurm"), "--slurm-init-seconds-before-status-checks", "5",
              "--slurm-keep-successful-logs")
# Client commands of slurm-client: hidden from PATH to play a machine without SLURM.
SLURM_TOOLS = {"sacct", "sacctmgr", "salloc", "sattach", "sbatch", "sbcast", "scancel", "scontrol", "scrontab",
               "sdiag", "sinfo", "sprio", "squeue", "sreport", "srun", "sshare", "sstat", "strigger", "sview"}
# Per-rule resources the SLURM run asks for: they must reach sbatch and change no result.
PRETRAIN_RESOURCES = {"mem_mb": 1500, "runtime": 7, "cpus_per_task": 2}


def run(workdir: Path, *args, target: str, limit: int = 300, env: dict | None = None):
    """snakemake on the tiny config in `workdir`, under `timeout -k` (a stuck cluster cannot hang the suite)."""
    env = env or {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = ["timeout", "-k", "10", str(limit), SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), *args, target]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=limit + 30)
    proc.wall = time.monotonic() - start
    proc.out = proc.stdout + proc.stderr
    return proc


def check(proc):
    assert proc.returncode == 0, f"snakemake failed ({proc.returncode}):\n{proc.out[-6000:]}"
    return proc


def submitted(out: str) -> dict[str, str]:
    """{rule: SLURM job id} from the executor's 'submitted with SLURM jobid' lines."""
    found = re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+)/\1\.log\)", out)
    return {rule: job for job, rule in found}


def squeue_all() -> dict[str, dict]:
    """Every job the controller still knows (finished ones for MinJobAge), by id."""
    proc = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%i|%T|%k|%V|%S|%e"],
                          capture_output=True, text=True, check=True, timeout=30)
    jobs = {}
    for line in proc.stdout.splitlines():
        job, state, comment, submit, start, end = line.strip().split("|")
        jobs[job] = {"state": state, "comment": comment, "submit": submit, "start": start, "end": end}
    return jobs


def seconds(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


# ---- without a cluster ------------------------------------------------------------------------------

@pytest.mark.integration
def test_rule_resources_come_from_the_config_section(tmp_path):
    write_config(tmp_path, resources={"default": {"mem_mb": 1234, "slurm_account": "lab"},
                                      "pretrain": {"gpu": 1, "gpu_model": "a100", "runtime": "2h",
                                                   "cpus_per_task": 3, "slurm_account": None}})
    proc = check(run(tmp_path, "--cores", "4", "--dry-run", target="results/pretrain/model.pt"))
    jobs = dict(re.findall(r"^rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", proc.out, re.M))
    assert set(jobs) == set(SMOKE)
    for rule, line in jobs.items():
        res = dict(kv.split("=", 1) for kv in line.split(", "))
        assert res["mem_mb"] == "1234"
        if rule == "pretrain":  # overrides key by key; null removes the default's account
            assert (res["runtime"], res["gpu"], res["gpu_model"]) == ("120", "1", "a100")
            assert "slurm_account" not in res
        else:
            assert (res["runtime"], res["slurm_account"]) == ("60", "lab") and "gpu" not in res
    assert re.search(r"^rule pretrain:\n(?:    .*\n)*?    threads: 3$", proc.out, re.M)
    assert not re.search(r"^rule tokenize:\n(?:    .*\n)*?    threads:", proc.out, re.M)  # 1: not shown


def test_a_misspelt_rule_in_resources_is_an_error():
    with pytest.raises(LmforgeError, match=r"unknown config key\(s\) 'pretrian' in 'resources'"):
        apply_schema({"resources": {"pretrian": {"gpu": 1}}})
    with pytest.raises(LmforgeError, match=r"resources.pretrain.gpu_model"):
        apply_schema({"resources": {"pretrain": {"gpu_model": "'a100'"}}})


@pytest.mark.integration
def test_the_slurm_profile_without_sbatch_says_so(tmp_path):
    # A machine without SLURM: every PATH entry, minus SLURM's client commands.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        for tool in Path(folder).glob("*") if Path(folder).is_dir() else ():
            if tool.name not in SLURM_TOOLS and not os.path.lexists(bin_dir / tool.name):
                (bin_dir / tool.name).symlink_to(tool)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = str(bin_dir)
    write_config(tmp_path)
    proc = run(tmp_path, *SLURM_ARGS, target="results/pretrain/model.pt", limit=120, env=env)
    assert proc.returncode != 0
    assert "the slurm profile (--executor slurm) needs sbatch on PATH" in proc.out
    assert "submitted" not in proc.out and not (tmp_path / "results").exists()


# ---- on a one-node cluster --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    """Start the cluster (installing slurm + munge with apt-get if needed); stop its daemons afterwards."""
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld and slurmd needs root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install slurmctld, slurmd, munge")
    # One cluster per machine at a time: concurrent test runs wait here.
    lock = open("/tmp/lmforge-slurm.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        proc = subprocess.run(["timeout", "-k", "10", "300", str(START)], capture_output=True, text=True)
        if proc.returncode == 3:
            pytest.skip(proc.stderr.strip())
        assert proc.returncode == 0, f"start-slurm.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        yield
    finally:
        if shutil.which("scancel"):  # the cluster is this test's own: no job of anyone else is on it
            subprocess.run(["timeout", "30", "scancel", "--user", "root"], capture_output=True)
        subprocess.run(["timeout", "-k", "5", "60", str(START), "stop"], capture_output=True)
        lock.close()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("local")
    write_config(workdir)
    return workdir, check(run(workdir, "--cores", "1", target="results/pretrain/model.pt"))


@pytest.fixture(scope="module")
def slurm(cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm")
    write_config(workdir, resources={"pretrain": PRETRAIN_RESOURCES})
    return workdir, check(run(workdir, *SLURM_ARGS, target="results/pretrain/model.pt"))


@pytest.mark.integration
def test_each_rule_is_a_slurm_job(slurm, local):
    workdir, proc = slurm
    jobs = submitted(proc.out)
    assert set(jobs) == set(SMOKE) and executed(proc) == set(SMOKE)
    known = squeue_all()
    for rule, job in jobs.items():
        assert known[job]["state"] == "COMPLETED" and known[job]["comment"] == f"rule_{rule}"
        log = (workdir / f".snakemake/slurm_logs/rule_{rule}/{job}.log").read_text()
        assert f"rule {rule}:" in log  # the job step ran the rule inside the allocation
    # resources.pretrain reached sbatch (--time 7, --mem 1500, --cpus-per-task 2 from the rule's threads);
    # the other rules kept resources.default.
    show = subprocess.run(["scontrol", "show", "job", jobs["pretrain"]], capture_output=True, text=True).stdout
    assert all(f in show for f in ("TimeLimit=00:07:00", "MinMemoryNode=1500M", "NumCPUs=2")), show
    show = subprocess.run(["scontrol", "show", "job", jobs["tokenize"]], capture_output=True, text=True).stdout
    assert all(f in show for f in ("TimeLimit=01:00:00", "MinMemoryNode=4000M", "NumCPUs=1")), show
    # What SLURM costs (1 s resolution): queue wait, Snakemake's start inside the job, the time from a
    # job's end to the next submission (status polling), and the whole chain against the local run.
    _, local_proc = local
    print(f"\nlocal run {local_proc.wall:.1f} s; SLURM run {proc.wall:.1f} s")
    previous_end = None
    for rule in SMOKE:
        j = known[jobs[rule]]
        log = (workdir / f".snakemake/slurm_logs/rule_{rule}/{jobs[rule]}.log").read_text()
        stamp = re.search(rf"^\[(.+?)\]\nrule {rule}:", log, re.M).group(1)
        rule_start = datetime.strptime(stamp, "%a %b %d %H:%M:%S %Y").isoformat()
        print(f"  {rule}: submit->start {seconds(j['submit'], j['start']):.0f} s, "
              f"start->rule {seconds(j['start'], rule_start):.0f} s, rule->end {seconds(rule_start, j['end']):.0f} s"
              + (f", previous end->submit {seconds(previous_end, j['submit']):.0f} s" if previous_end else ""))
        previous_end = j["end"]
        assert seconds(j["submit"], j["start"]) <= 30


@pytest.mark.integration
def test_slurm_results_equal_the_local_ones(slurm, local):
    (a, _), (b, _) = local, slurm
    # Tokenizer and token streams are exact; the weights agree to float32 rounding (CPU matmul kernels
    # may sum in a different order from one process to the next, SLURM or not).
    for f in ("tokenizer/tokenizer.json", "data/pretrain/train.bin", "data/pretrain/val.bin"):
        assert (a / "results" / f).read_bytes() == (b / "results" / f).read_bytes(), f
    wa = read_checkpoint(a / "results/pretrain/model.pt")["state_dict"]
    wb = read_checkpoint(b / "results/pretrain/model.pt")["state_dict"]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    ma, mb = (json.loads((w / "results/pretrain/metrics.json").read_text()) for w in (a, b))
    assert ma["steps"] == mb["steps"] == 12
    assert mb["val_loss"] == pytest.approx(ma["val_loss"], rel=1e-5)


@pytest.mark.integration
def test_changing_resources_reruns_nothing(slurm):
    workdir, _ = slurm
    # Compared with a dry run just before the change, so that a library edit since the run shows in both.
    before = check(run(workdir, "--cores", "2", "--dry-run", target="results/pretrain/model.pt"))
    write_config(workdir, resources={"default": {"mem_mb": 8000, "cpus_per_task": 2, "runtime": "3h"},
                                     "pretrain": {"gpu": 1, "slurm_partition": "gpu"}})
    after = check(run(workdir, "--cores", "2", "--dry-run", target="results/pretrain/model.pt"))
    assert executed(after) == executed(before), after.out  # both empty unless the library changed


@pytest.mark.integration
def test_a_cancelled_job_fails_the_run_and_the_rerun_resumes(slurm, tmp_path):
    # The tokenizer and token files of the SLURM run, with their Snakemake metadata: up to date here.
    built, _ = slurm
    for part in ("results/tokenizer", "results/data", ".snakemake/metadata"):
        shutil.copytree(built / part, tmp_path / part)
    long = {"pretrain.checkpoint_every": 20, "pretrain.eval_every": 0}
    write_config(tmp_path, **long, **{"pretrain.max_steps": 2000})
    # pretrain as a SLURM job; once its resume checkpoint is on disk, cancel the job in SLURM.
    out_path = tmp_path / "snakemake.out"
    cmd = ["timeout", "-k", "10", "300", SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(tmp_path / "config.yaml"), *SLURM_ARGS, "results/pretrain/model.pt"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    ckpt = tmp_path / "results/.checkpoints/pretrain/last.pt"
    deadline = time.time() + 180
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    job = submitted(out_path.read_text()).get("pretrain")
    assert ckpt.exists() and job and proc.poll() is None, out_path.read_text()
    subprocess.run(["scancel", job], check=True, timeout=30)
    rc = proc.wait(timeout=240)
    text = out_path.read_text()
    assert rc != 0 and set(submitted(text)) == {"pretrain"}, text
    assert "Error in rule pretrain:" in text and f"SLURM-job '{job}' failed" in text and "CANCELLED" in text
    assert not (tmp_path / "results/pretrain/model.pt").exists()
    deadline = time.time() + 60
    while squeue_all().get(job, {}).get("state") == "COMPLETING" and time.time() < deadline:
        time.sleep(0.5)  # after COMPLETING the job's processes are gone: the checkpoint is final
    killed_at = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < killed_at < 2000
    # The rerun (the same command, the same config) picks up at the checkpoint.
    rerun = check(run(tmp_path, *SLURM_ARGS, target="results/pretrain/model.pt"))
    assert set(submitted(rerun.out)) == {"pretrain"}
    metrics = json.loads((tmp_path / "results/pretrain/metrics.json").read_text())
    assert metrics["resumed_from"] == killed_at and metrics["steps"] == 2000
    assert f"[pretrain] resumed {ckpt.relative_to(tmp_path)} at step {killed_at}" in (
        tmp_path / "results/logs/pretrain.log").read_text()
