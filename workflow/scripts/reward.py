"""Rule 'reward': see lmforge.stages.reward."""
from lmforge.stages import reward
from lmforge.workflow import run_script

run_script(snakemake, lambda env: reward.run(dict(snakemake.params.items()), dict(snakemake.input.items()),
                                     dict(snakemake.output.items()), env))
