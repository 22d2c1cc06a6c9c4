"""Rule 'sft': see lmforge.stages.sft; several processes run it under torchrun (lmforge.distributed)."""
from lmforge.distributed import launch, settings
from lmforge.workflow import run_script

run_script(snakemake, lambda env: launch("sft", dict(snakemake.params.items()), dict(snakemake.input.items()),
                                         dict(snakemake.output.items()), env, **settings(snakemake.config, "sft")))
