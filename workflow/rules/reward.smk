rule reward:
    input:
        model=rules.sft.output.model,
        # A data file is an input only when configured; builtin data is made from params.
        **({"data": config["reward"]["data"]} if config["reward"]["data"] else {}),
    output:
        model="results/reward/model.pt",
        metrics="results/reward/metrics.json",
    params:
        **section("reward"),
        data={"builtin": config["data"]["builtin"]},
        code=code_version("model.py", "train/loop.py", "train/reward.py", "train/sft.py", "train/optim.py",
                          "data/builtin.py", "data/formats.py", "data/records.py", "tokenizer.py",
                          "stages/reward.py", "checkpoint.py"),
    log:
        "results/logs/reward.log",
    conda:
        "../envs/lmforge.yaml"
    script:
        "../scripts/reward.py"
