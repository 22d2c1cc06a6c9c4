"""Rule 'star': see lmforge.stages.star."""
from lmforge.stages import star
from lmforge.workflow import run_script

run_script(snakemake, lambda env: star.run(dict(snakemake.params.items()), dict(snakemake.input.items()),
                                     dict(snakemake.output.items()), env))
