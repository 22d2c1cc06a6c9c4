# lmforge: tokenizer -> tokenize -> pretrain (-> sft -> reward -> dpo/ppo/grpo/star -> evaluate)
from snakemake.utils import min_version, validate

from lmforge.config import load_schema
from lmforge.workflow import coerce_strings

min_version("9.0")


configfile: "config/config.yaml"


# --config values arrive as text below the top level ("0", "[1, 2]" items): typed by the schema first.
config.update(coerce_strings(config, load_schema()))
validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/pipeline.smk"


# `seeds: [1, 2, 3]`: the same pipeline once per seed, under results/seeds/<seed>/results/ (each one a
# Snakemake module with the seed set in its config), and results/seeds/summary.csv: mean and std of
# every evaluation metric per stage across the seeds. workflow.module/userule are what the `module`
# and `use rule` keywords compile to; the keywords cannot take a name made in a loop.
for _seed in config["seeds"]:
    workflow.module(snakefile="workflow/pipeline.smk", config={**config, "seed": _seed, "seeds": []},
                    prefix=f"results/seeds/{_seed}", name=f"seed{_seed}")
    workflow.userule(rules=["*"], from_module=f"seed{_seed}", exclude_rules=[],
                     name_modifier=f"seed{_seed}_*", lineno=1)(lambda: None)


rule all:
    input:
        "results/pretrain/model.pt",
        "results/sft/model.pt",
        "results/reward/model.pt",
        "results/scored/summary.json",
        "results/dpo/model.pt",
        "results/ppo/model.pt",
        "results/grpo/model.pt",
        "results/star/model.pt",
        "results/eval/report.md",


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
