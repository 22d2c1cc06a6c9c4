"""Rule 'evaluate': see lmforge.stages.evaluate."""
from lmforge.stages import evaluate
from lmforge.workflow import run_script

run_script(snakemake, lambda env: evaluate.run(dict(snakemake.params.items()), dict(snakemake.input.items()),
                                     dict(snakemake.output.items()), env))
