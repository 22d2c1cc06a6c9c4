# Shared by the rules. Every value a stage's result depends on reaches its rule
# through params:, so Snakemake reruns exactly what a change makes stale.
from lmforge.config import check_config
from lmforge.workflow import code_version, config_sections, optional_inputs

# Cross-field checks (d_model % n_heads, warmup < max_steps, ...) before any job runs.
config = check_config(config)
section = config_sections(config)
# The pretraining corpus depends on these data keys only (not on data.builtin's task knobs).
corpus = {k: config["data"][k] for k in ("sources", "val_fraction", "max_docs")}
