"""Rule 'ppo': see lmforge.stages.ppo."""
from lmforge.stages import ppo
from lmforge.workflow import run_script

run_script(snakemake, lambda env: ppo.run(dict(snakemake.params.items()), dict(snakemake.input.items()),
                                     dict(snakemake.output.items()), env))
