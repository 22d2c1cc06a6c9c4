# lmforge: tokenizer -> tokenize -> pretrain (-> sft -> reward -> dpo/ppo/grpo -> evaluate)
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/sft.smk"
include: "workflow/rules/reward.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/align.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        "results/pretrain/model.pt",
        "results/sft/model.pt",
        "results/reward/model.pt",
        "results/scored/summary.json",
        "results/dpo/model.pt",
        "results/ppo/model.pt",
        "results/grpo/model.pt",
        "results/eval/report.md",
