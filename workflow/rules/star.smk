# STaR / rejection-sampling fine-tuning of the SFT model on its own verified-correct answers.


rule star:
    input:
        policy=rules.sft.output.model,
        **optional_inputs(config, "star"),
    output:
        model="results/star/model.pt",
        metrics="results/star/metrics.json",
    params:
        **section("star"),
        data={"builtin": config["data"]["builtin"]},
        code=code_version(*ALIGN_CODE, "train/rollout.py", "train/star.py", "stages/grpo.py", "stages/star.py"),
    threads: threads_for("star")
    resources:
        **resources_for("star"),
    log:
        "results/logs/star.log",
    conda:
        "../envs/lmforge.yaml"
    script:
        "../scripts/star.py"
