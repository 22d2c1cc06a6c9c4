rule sft:
    input:
        model=rules.pretrain.output.model,
        # A data file is an input only when configured; builtin data is made from params.
        **optional_inputs(config, "sft"),
    output:
        model="results/sft/model.pt",
        metrics="results/sft/metrics.json",
    params:
        **section("sft"),
        data={"builtin": config["data"]["builtin"]},
        code=code_version("model.py", "lora.py", "quant.py", "train/loop.py", "distributed.py", "train/sft.py", "train/optim.py", "data/builtin.py",
                          "data/formats.py", "data/records.py", "tokenizer.py", "generate.py", "tasks.py",
                          "stages/sft.py", "checkpoint.py"),
    threads: threads_for("sft")
    resources:
        **resources_for("sft"),
    log:
        "results/logs/sft.log",
    conda:
        "../envs/lmforge.yaml"
    script:
        "../scripts/sft.py"
