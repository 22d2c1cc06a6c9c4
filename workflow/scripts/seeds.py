"""Rule 'seeds_summary': see lmforge.report.write_seed_summary."""
from lmforge.report import write_seed_summary
from lmforge.workflow import run_script

run_script(snakemake, lambda env: write_seed_summary(dict(zip(snakemake.params.seeds, snakemake.input)),
                                                     snakemake.output.csv, snakemake.output.md))
