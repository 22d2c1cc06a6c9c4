"""The script of every stage rule: runs lmforge.stages.<stage>.run (see lmforge.pipeline for what each
stage reads and writes; several processes under torchrun when distributed.nproc asks for them)."""
from lmforge.workflow import run_rule

run_rule(snakemake)
