"""Rule 'score': see lmforge.stages.score."""
from lmforge.stages import score
from lmforge.workflow import run_script

run_script(snakemake, lambda env: score.run(dict(snakemake.params.items()), dict(snakemake.input.items()),
                                     dict(snakemake.output.items()), env))
