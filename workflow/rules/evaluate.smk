STAGE_MODELS = {
    "pretrain": rules.pretrain.output.model,
    "sft": rules.sft.output.model,
    "dpo": rules.dpo.output.model,
    "ppo": rules.ppo.output.model,
    "grpo": rules.grpo.output.model,
    "star": rules.star.output.model,
}


rule evaluate:
    input:
        # One input per evaluated stage: models_<stage>.
        **{f"model_{s}": STAGE_MODELS[s] for s in config["eval"]["stages"]},
        reward_model=rules.reward.output.model,
        val=rules.tokenize.output.val,
        meta=rules.tokenize.output.meta,
    output:
        metrics="results/eval/metrics.csv",
        summary="results/eval/summary.json",
        report="results/eval/report.md",
    params:
        **section("eval"),
        data={"builtin": config["data"]["builtin"]},
        code=code_version("model.py", "lora.py", "quant.py", "generate.py", "rewards.py", "tasks.py", "tokenizer.py", "train/lm.py",
                          "train/policy.py", "data/builtin.py", "evaluate.py", "report.py", "stages/evaluate.py", "stages/common.py",
                          "checkpoint.py"),
    threads: threads_for("evaluate")
    resources:
        **resources_for("evaluate"),
    log:
        "results/logs/evaluate.log",
    conda:
        "../envs/lmforge.yaml"
    script:
        "../scripts/evaluate.py"
