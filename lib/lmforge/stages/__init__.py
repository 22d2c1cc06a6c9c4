"""Stage runners: read input artifacts, call the library, write output artifacts, track the run.

Each ``run(params, inputs, outputs, env)`` is what one Snakemake rule (or one
``lmforge run STAGE`` call) executes. ``params`` holds every value the result
depends on; ``env`` the execution settings that don't change results.
"""
