rule pretrain:
    input:
        tokenizer=rules.tokenizer.output.tokenizer,
        train=rules.tokenize.output.train,
        val=rules.tokenize.output.val,
        meta=rules.tokenize.output.meta,
        **init_from_files(config["model"]["init_from"], "config", "weights"),
    output:
        model="results/pretrain/model.pt",
        metrics="results/pretrain/metrics.json",
    params:
        **section("model", "pretrain"),
        code=code_version("model.py", "lora.py", "quant.py", "train/loop.py", "distributed.py", "train/lm.py", "train/optim.py", "stages/pretrain.py", "checkpoint.py",
                          *(["hf.py"] if config["model"]["init_from"] else [])),
    threads: threads_for("pretrain")
    resources:
        **resources_for("pretrain"),
    log:
        "results/logs/pretrain.log",
    conda:
        "../envs/lmforge.yaml"
    script:
        "../scripts/pretrain.py"
