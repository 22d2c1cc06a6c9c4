rule sft:
    input:
        model=rules.pretrain.output.model,
        # A data file is an input only when configured; builtin data is made from params.
        **({"data": config["sft"]["data"]} if config["sft"]["data"] else {}),
    output:
        model="results/sft/model.pt",
        metrics="results/sft/metrics.json",
    params:
        **section("sft"),
        data={"builtin": config["data"]["builtin"]},
        code=code_version("model.py", "train/loop.py", "train/sft.py", "train/optim.py", "data/builtin.py",
                          "data/formats.py", "data/records.py", "tokenizer.py", "generate.py", "tasks.py",
                          "stages/sft.py", "checkpoint.py"),
    log:
        "results/logs/sft.log",
    conda:
        "../envs/lmforge.yaml"
    script:
        "../scripts/sft.py"
