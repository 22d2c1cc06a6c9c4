# lmforge: tokenizer -> tokenize -> pretrain -> sft -> reward / score -> dpo / ppo / grpo / star -> evaluate.
# The stages are declared once in lib/lmforge/pipeline.py; workflow/rules/stages.smk makes them rules.
from snakemake.utils import min_version, validate

from lmforge.config import coerce_strings, load_schema, reject_renamed

min_version("9.0")


configfile: "config/config.yaml"


# A renamed key fails naming its new name. --config values arrive as text below the top level
# ("0", "[1, 2]" items): typed by the schema first.
config.update(coerce_strings(reject_renamed(config), load_schema()))
validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/stages.smk"


rule all:
    input:
        FINAL_OUTPUTS,


# `seeds: [1, 2, 3]`: the pipeline once per seed (rules seed<seed>_<stage>, under results/seeds/<seed>/),
# and results/seeds/summary.csv: mean and std of every evaluation metric per stage across the seeds.
rule seeds_summary:
    input:
        expand("results/seeds/{seed}/results/eval/metrics.csv", seed=config["seeds"]),
    output:
        csv="results/seeds/summary.csv",
        md="results/seeds/summary.md",
    params:
        seeds=config["seeds"],
    threads: threads_for("seeds_summary")
    resources:
        **resources_for("seeds_summary"),
    log:
        "results/logs/seeds_summary.log",
    conda:
        "workflow/envs/lmforge.yaml"
    script:
        "workflow/scripts/seeds.py"
