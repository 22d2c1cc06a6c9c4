rule score:
    input:
        policy=rules.sft.output.model,
        # The reward model and a prompt file are inputs only when the config uses them.
        **optional_inputs(config, "score"),
    output:
        samples="results/scored/samples.parquet",
        summary="results/scored/summary.json",
        pairs="results/scored/pairs.jsonl",
    params:
        **section("score"),
        data={"builtin": config["data"]["builtin"]},
        code=code_version("model.py", "lora.py", "quant.py", "generate.py", "rewards.py", "tasks.py", "tokenizer.py", "data/builtin.py",
                          "data/formats.py", "data/records.py", "stages/score.py", "checkpoint.py"),
    threads: threads_for("score")
    resources:
        **resources_for("score"),
    log:
        "results/logs/score.log",
    conda:
        "../envs/lmforge.yaml"
    script:
        "../scripts/score.py"
