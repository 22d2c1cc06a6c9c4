# Every stage of the pipeline as a rule, built from the one declaration in lmforge.pipeline (the same
# one `lmforge run` reads): once for results/, and once more per entry of `seeds:` under
# results/seeds/<seed>/ (rules seed<seed>_<stage>). Params are canonical and carry the hash of the
# stage's code closure, so a value or a library file a stage reads reruns exactly that stage and what
# depends on it.
for _rule_prefix, _path_prefix, _config in instances(config):
    for _stage in STAGES:

        rule:
            name:
                _rule_prefix + _stage
            input:
                **stage_inputs(_stage, _config, _path_prefix),
            output:
                **stage_outputs(_stage, _path_prefix),
            params:
                **stage_params(_stage, _config),
            threads: threads_for(_stage)
            resources:
                **resources_for(_stage),
            log:
                log_path(_stage, _path_prefix),
            conda:
                "../envs/lmforge.yaml"
            script:
                "../scripts/stage.py"
