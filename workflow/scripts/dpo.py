"""Rule 'dpo': see lmforge.stages.dpo."""
from lmforge.stages import dpo
from lmforge.workflow import run_script

run_script(snakemake, lambda env: dpo.run(dict(snakemake.params.items()), dict(snakemake.input.items()),
                                     dict(snakemake.output.items()), env))
