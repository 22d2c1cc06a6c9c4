# The whole pipeline, every rule of it: included once by the Snakefile for results/, and once more
# per entry of `seeds:` as a module whose paths are prefixed with results/seeds/<seed>/.
include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/pretrain.smk"
include: "rules/sft.smk"
include: "rules/reward.smk"
include: "rules/score.smk"
include: "rules/align.smk"
include: "rules/star.smk"
include: "rules/evaluate.smk"
