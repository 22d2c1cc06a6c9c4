rule tokenizer:
    output:
        tokenizer="results/tokenizer/tokenizer.json",
        stats="results/tokenizer/stats.json",
    params:
        **section("tokenizer"),
        data=corpus,
        code=code_version("tokenizer.py", "data/sources.py", "data/builtin.py", "stages/tokenizer.py"),
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
    log:
        "results/logs/tokenize.log",
    conda:
        "../envs/lmforge.yaml"
    script:
        "../scripts/tokenize.py"
