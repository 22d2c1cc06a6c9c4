# Alignment of the SFT model: DPO on preference pairs, PPO and GRPO on rollouts.
ALIGN_CODE = ("model.py", "train/loop.py", "distributed.py", "train/optim.py", "train/policy.py", "train/sft.py",
              "train/reward.py", "generate.py", "rewards.py", "tasks.py", "tokenizer.py", "config.py", "device.py",
              "data/builtin.py", "data/formats.py", "data/records.py", "checkpoint.py", "stages/common.py", "stages/sft.py",
              "lora.py", "quant.py", "data/sources.py")


rule dpo:
    input:
        policy=rules.sft.output.model,
        **optional_inputs(config, "dpo"),
    output:
        model="results/dpo/model.pt",
        metrics="results/dpo/metrics.json",
    params:
        **section("dpo"),
        data={"builtin": config["data"]["builtin"]},
        code=code_version(*ALIGN_CODE, "train/dpo.py", "stages/dpo.py"),
    threads: threads_for("dpo")
    resources:
        **resources_for("dpo"),
    log:
        "results/logs/dpo.log",
    conda:
        "../envs/lmforge.yaml"
    script:
        "../scripts/dpo.py"


rule ppo:
    input:
        policy=rules.sft.output.model,
        **optional_inputs(config, "ppo"),
    output:
        model="results/ppo/model.pt",
        metrics="results/ppo/metrics.json",
    params:
        **section("ppo"),
        data={"builtin": config["data"]["builtin"]},
        code=code_version(*ALIGN_CODE, "train/rollout.py", "train/ppo.py", "stages/ppo.py"),
    threads: threads_for("ppo")
    resources:
        **resources_for("ppo"),
    log:
        "results/logs/ppo.log",
    conda:
        "../envs/lmforge.yaml"
    script:
        "../scripts/ppo.py"


rule grpo:
    input:
        policy=rules.sft.output.model,
        **optional_inputs(config, "grpo"),
    output:
        model="results/grpo/model.pt",
        metrics="results/grpo/metrics.json",
    params:
        **section("grpo"),
        data={"builtin": config["data"]["builtin"]},
        code=code_version(*ALIGN_CODE, "train/rollout.py", "train/grpo.py", "stages/grpo.py"),
    threads: threads_for("grpo")
    resources:
        **resources_for("grpo"),
    log:
        "results/logs/grpo.log",
    conda:
        "../envs/lmforge.yaml"
    script:
        "../scripts/grpo.py"
