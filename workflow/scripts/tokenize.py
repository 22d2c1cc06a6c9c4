"""Rule 'tokenize': see lmforge.stages.tokenize."""
from lmforge.stages import tokenize
from lmforge.workflow import run_script

run_script(snakemake, lambda env: tokenize.run(dict(snakemake.params.items()), dict(snakemake.input.items()),
                                          dict(snakemake.output.items()), env))
