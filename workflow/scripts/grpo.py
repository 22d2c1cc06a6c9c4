"""Rule 'grpo': see lmforge.stages.grpo."""
from lmforge.stages import grpo
from lmforge.workflow import run_script

run_script(snakemake, lambda env: grpo.run(dict(snakemake.params.items()), dict(snakemake.input.items()),
                                     dict(snakemake.output.items()), env))
