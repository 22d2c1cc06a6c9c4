rule tokenizer:
    input:
        # A local model.init_from folder: a new tokenizer.json there reruns the tokenizer.
        **init_from_files(config["model"]["init_from"], "tokenizer"),
    output:
        tokenizer="results/tokenizer/tokenizer.json",
        stats="results/tokenizer/stats.json",
    params:
        **section("tokenizer"),
        data=corpus,
        init_from=config["model"]["init_from"],
        code=code_version("tokenizer.py", "data/sources.py", "data/builtin.py", "stages/tokenizer.py",
                          *(["hf.py"] if config["model"]["init_from"] else [])),
    threads: threads_for("tokenizer")
    resources:
        **resources_for("tokenizer"),
    log:
        "results/logs/tokenizer.log",
    conda:
        "../envs/lmforge.yaml"
    script:
        "../scripts/tokenizer.py"


rule tokenize:
    input:
        tokenizer=rules.tokenizer.output.tokenizer,
    output:
        train="results/data/pretrain/train.bin",
        val="results/data/pretrain/val.bin",
        meta="results/data/pretrain/meta.json",
    params:
        **section(),
        data=corpus,
        code=code_version("tokenizer.py", "data/sources.py", "data/builtin.py", "data/corpus.py", "stages/tokenize.py"),
    threads: threads_for("tokenize")
    resources:
        **resources_for("tokenize"),
    log:
        "results/logs/tokenize.log",
    conda:
        "../envs/lmforge.yaml"
    script:
        "../scripts/tokenize.py"
