# Shared by the rules. Every value a stage's result depends on reaches its rule as a param
# (lmforge.pipeline.stage_params), so Snakemake reruns exactly what a change makes stale.
import shutil

from lmforge.config import check_config
from lmforge.errors import LmforgeError
from lmforge.pipeline import (FINAL_OUTPUTS, STAGES, instances, log_path, process_settings, stage_inputs,
                              stage_outputs, stage_params)

# Cross-field checks (d_model % n_heads, warmup < max_steps, ...) before any job runs.
config = check_config(config)


# Execution settings of each rule, never params (changing them reruns nothing). The config's
# resources.default applies to every rule, resources.<rule> overrides it key by key, and a null
# leaves the key to the executor or the cluster. cpus_per_task becomes the rule's threads, which
# the SLURM executor turns into --cpus-per-task (so --set-threads still works).
def _rule_resources(name):
    merged = {**config["resources"]["default"], **(config["resources"].get(name) or {})}
    return {k: v for k, v in merged.items() if v is not None}


def resources_for(name):
    """Snakemake resources of one rule: mem_mb, runtime, gpu, gpu_model, slurm_partition, slurm_account."""
    return {k: v for k, v in _rule_resources(name).items() if k != "cpus_per_task"}


def threads_for(name):
    """Threads of one rule (resources.*.cpus_per_task, default 1), at least one per process it starts."""
    return max(_rule_resources(name).get("cpus_per_task", 1), process_settings(config, name)["nproc"])


onstart:
    # The SLURM executor calls sbatch for every job; without it each job would fail on its own.
    plugin = workflow.executor_plugin
    if plugin is not None and plugin.name == "slurm" and shutil.which("sbatch") is None:
        raise LmforgeError("the slurm profile (--executor slurm) needs sbatch on PATH: run Snakemake where "
                           "SLURM's client commands are installed (a login node), or run locally with --cores N")
