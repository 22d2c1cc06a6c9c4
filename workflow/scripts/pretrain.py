"""Rule 'pretrain': see lmforge.stages.pretrain."""
from lmforge.stages import pretrain
from lmforge.workflow import run_script

run_script(snakemake, lambda env: pretrain.run(dict(snakemake.params.items()), dict(snakemake.input.items()),
                                          dict(snakemake.output.items()), env))
