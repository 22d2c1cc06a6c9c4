"""Rule 'pretrain': see lmforge.stages.pretrain; several processes run it under torchrun (lmforge.distributed)."""
from lmforge.distributed import launch, settings
from lmforge.workflow import run_script

run_script(snakemake, lambda env: launch("pretrain", dict(snakemake.params.items()), dict(snakemake.input.items()),
                                         dict(snakemake.output.items()), env, **settings(snakemake.config, "pretrain")))
