rule reward:
    input:
        model=rules.sft.output.model,
        # A data file is an input only when configured; builtin data is made from params.
        **optional_inputs(config, "reward"),
    output:
        model="results/reward/model.pt",
        metrics="results/reward/metrics.json",
    params:
        **section("reward"),
        data={"builtin": config["data"]["builtin"]},
        code=code_version("model.py", "lora.py", "quant.py", "train/loop.py", "distributed.py", "train/reward.py", "train/sft.py", "train/optim.py",
                          "data/builtin.py", "data/formats.py", "data/records.py", "tokenizer.py",
                          "stages/reward.py", "checkpoint.py"),
    threads: threads_for("reward")
    resources:
        **resources_for("reward"),
    log:
        "results/logs/reward.log",
    conda:
        "../envs/lmforge.yaml"
    script:
        "../scripts/reward.py"
