"""Rule 'sft': see lmforge.stages.sft."""
from lmforge.stages import sft
from lmforge.workflow import run_script

run_script(snakemake, lambda env: sft.run(dict(snakemake.params.items()), dict(snakemake.input.items()),
                                     dict(snakemake.output.items()), env))
