"""Rule 'tokenizer': see lmforge.stages.tokenizer."""
from lmforge.stages import tokenizer
from lmforge.workflow import run_script

run_script(snakemake, lambda env: tokenizer.run(dict(snakemake.params.items()), dict(snakemake.input.items()),
                                          dict(snakemake.output.items()), env))
