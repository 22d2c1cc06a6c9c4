"""One config class per section of the pipeline config: its fields and the rules between them.

The schema (``config.schema.yaml``) gives every key its type, allowed values
and default; a class here is built from a schema-completed section and checks
what a schema cannot say (``warmup_steps < max_steps``, a batch that splits
evenly, ...). ``lmforge.config.check_config`` runs ``check_config`` of every
class in ``SECTIONS``; the stages build the same classes to read their knobs.
Every error is one line naming the config key. Torch-free: checking a config
must not import torch.

Batch vocabulary, the same in every section: ``batch_size`` counts the examples
of one forward-backward pass (sequences, packed rows, pairs or rollouts, as each
section says), ``grad_accum_steps`` the passes per optimizer step, and
``rollout_batch_size`` (ppo, grpo) the prompts sampled per iteration.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.hf_config import check_init_from
from lmforge.model_config import ModelConfig

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_QUANTIZE = (None, "nf4")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
GRPO_SCALE_REWARDS = ("group", "batch", "none")


class Section:
    """Build from a schema-completed section dict, keeping only this class's keys, then ``check``."""

    @classmethod
    def from_dict(cls, section: dict[str, Any], key: str):
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in section.items() if k in names})
        cfg.check(key)
        return cfg

    def check(self, key: str) -> None:
        """The rules between this section's fields; raise LmforgeError naming ``key.<field>``."""

    @classmethod
    def check_config(cls, config: dict, key: str):
        """The registry's entry point: a rule that reads another section overrides this."""
        return cls.from_dict(config[key], key)


# --------------------------------------------------------------------------- nested pieces


def unanswered(records) -> tuple[int, str] | None:
    """(how many prompts lack a reference answer, where the first is), or None when all have one."""
    missing = [i for i, r in enumerate(records) if r.get("answer") is None]
    if not missing:
        return None
    return len(missing), records[missing[0]].get("where", f"prompt {missing[0]}")


@dataclass
class RewardSpec:
    """A stage's ``reward_fn``: reward = rm * reward-model score + verifiable * correct
    + partial * partial credit + hf * external model score."""

    rm: float = 0.0
    """Weight of the trained reward model's score (results/reward/model.pt)."""
    verifiable: float = 0.0
    """Weight of 1/0 for an answer that checks out against the prompt's reference answer."""
    partial: float = 0.0
    """Weight of partial credit in [0, 1] for a nearly right answer."""
    hf: float = 0.0
    """Weight of an external Hugging Face sequence-classification model's score."""
    hf_model: str | None = None
    """That external model: a local folder or hub id."""

    @classmethod
    def from_dict(cls, d: dict, key: str) -> "RewardSpec":
        spec = cls(**{k: d[k] for k in ("rm", "verifiable", "partial", "hf", "hf_model") if k in d})
        if spec.rm + spec.verifiable + spec.partial + spec.hf <= 0:
            raise LmforgeError(f"config key '{key}': every weight (rm, verifiable, partial, hf) is 0, "
                               f"so there is no reward")
        if spec.hf > 0 and not spec.hf_model:
            raise LmforgeError(f"config key '{key}.hf_model' is required when '{key}.hf' is above 0 "
                               f"(a local folder or hub id of a sequence-classification model)")
        return spec

    def check_prompts(self, records, source: str, key: str) -> None:
        """The verifiable reward and its partial credit need a reference answer on every prompt."""
        needs = [name for name in ("verifiable", "partial") if getattr(self, name) > 0]
        if not needs:
            return
        missing = unanswered(records)
        if missing:
            weights = " and ".join(f"'{key}.{name}' is {getattr(self, name)}" for name in needs)
            zero = " and ".join(f"'{key}.{name}: 0'" for name in needs)
            raise LmforgeError(
                f"config key {weights}, but {missing[0]} of {len(records)} prompts "
                f"in {source} have no reference answer (first: {missing[1]})"
                f"; give every prompt an 'answer' or set {zero}")


@dataclass
class LoraConfig:
    """A stage's ``lora:`` section: low-rank adapters instead of full fine-tuning (lmforge.lora)."""

    r: int = 8
    """Rank of the update B A."""
    alpha: float = 16.0
    """The update is scaled by alpha / r, so changing r leaves the initial step size alone."""
    dropout: float = 0.0
    """Dropout on the adapter's input (the base path sees the input undropped)."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))
    """The linear layers that get adapters."""
    quantize: str | None = None
    """null: float32 base (LoRA); nf4: 4-bit NormalFloat base (QLoRA)."""
    double_quant: bool = False
    """nf4 only: store the per-block scales in 8 bits too."""

    @classmethod
    def from_dict(cls, d: dict, key: str = "lora") -> "LoraConfig":
        """Build and check a config; every message names ``key``.<field>."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LmforgeError(f"unknown key(s) {', '.join(repr(u) for u in unknown)} in '{key}' "
                               f"(allowed: {', '.join(sorted(known))})")
        cfg = cls(**d)
        if isinstance(cfg.r, bool) or not isinstance(cfg.r, int) or cfg.r <= 0:
            raise LmforgeError(f"config key '{key}.r' ({cfg.r!r}) must be a positive integer (the adapter rank)")
        if isinstance(cfg.alpha, bool) or not isinstance(cfg.alpha, (int, float)) or cfg.alpha <= 0:
            raise LmforgeError(f"config key '{key}.alpha' ({cfg.alpha!r}) must be a positive number")
        if not (isinstance(cfg.dropout, (int, float)) and 0 <= cfg.dropout < 1):
            raise LmforgeError(f"config key '{key}.dropout' ({cfg.dropout!r}) must be a number in [0, 1)")
        targets = cfg.target_modules
        if (not isinstance(targets, (list, tuple)) or not targets
                or not all(isinstance(t, str) and t for t in targets)):
            raise LmforgeError(f"config key '{key}.target_modules' ({targets!r}) must be a non-empty list of "
                               f"module names (from: {', '.join(LORA_TARGET_MODULES)})")
        cfg.target_modules = list(targets)
        if cfg.quantize not in LORA_QUANTIZE:
            raise LmforgeError(f"config key '{key}.quantize' ({cfg.quantize!r}) must be null or 'nf4'")
        if not isinstance(cfg.double_quant, bool):
            raise LmforgeError(f"config key '{key}.double_quant' ({cfg.double_quant!r}) must be true or false")
        if cfg.double_quant and cfg.quantize is None:
            raise LmforgeError(f"config key '{key}.double_quant' is true but '{key}.quantize' is null: "
                               f"double quantization applies to a quantized base (quantize: nf4)")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


def check_lora(section_lora: dict | None, key: str) -> None:
    if section_lora is not None:
        LoraConfig.from_dict(section_lora, key=f"{key}.lora")


# --------------------------------------------------------------------------- tokenizer and model


@dataclass
class TokenizerConfig(Section):
    """The tokenizer, trained here (byte-level BPE) or loaded."""

    type: str = "bpe"
    """bpe: train a byte-level BPE here | pretrained: load ``path``."""
    path: str | None = None
    """tokenizer.json, a folder with one, or a hub id (type pretrained)."""
    vocab_size: int = 2048
    """BPE vocabulary, special tokens included."""
    min_frequency: int = 2
    """BPE merge threshold."""
    max_train_docs: int | None = None
    """Train the BPE on at most this many documents."""
    split_digits: bool = False
    """Every digit a token of its own."""

    @classmethod
    def check_config(cls, config: dict, key: str = "tokenizer") -> "TokenizerConfig":
        """The tokenizer must fit the model: its vocabulary, or the imported model's own tokenizer."""
        tok, model = cls.from_dict(config[key], key), config["model"]
        if model.get("init_from"):
            if tok.type == "pretrained":
                raise LmforgeError("config keys 'model.init_from' and 'tokenizer.type: pretrained' conflict: "
                                   "an imported model comes with its own tokenizer; remove one of them")
        elif tok.type == "bpe" and tok.vocab_size > model["vocab_size"]:
            raise LmforgeError(f"config key 'tokenizer.vocab_size' ({tok.vocab_size}) exceeds "
                               f"'model.vocab_size' ({model['vocab_size']})")
        if tok.type == "pretrained" and not tok.path:
            raise LmforgeError("config key 'tokenizer.path' is required when tokenizer.type is 'pretrained'")
        return tok


class ModelSection:
    """The ``model:`` section: an architecture (``ModelConfig``) and ``init_from``, an existing
    Hugging Face folder or hub id whose config.json replaces the architecture keys."""

    @staticmethod
    def check_config(config: dict, key: str = "model") -> ModelConfig:
        cfg = ModelConfig.from_section(config[key])
        if config[key].get("init_from"):
            check_init_from(config[key]["init_from"])  # a local folder now, a hub id when fetched
        return cfg


# --------------------------------------------------------------------------- training sections


@dataclass
class TrainConfig(Section):
    """The knobs every gradient-based stage shares (meanings: config.schema.yaml)."""

    optimizer: str = "adamw"
    """adamw | adafactor | lion | sophia | muon | adamw8bit."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    scheduler: str = "cosine"
    """none | cosine | linear | polynomial (after a linear warmup)."""
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    """Final lr = lr * min_lr_ratio."""
    lr_power: float = 1.0
    """Exponent of the polynomial schedule."""
    batch_size: int = 16
    """Examples per forward-backward pass (what an example is: the section's schema description)."""
    grad_accum_steps: int = 1
    """Forward-backward passes per optimizer step."""
    max_steps: int = 100
    """Optimizer steps."""
    grad_clip: float = 1.0
    """Max global gradient norm (0: off)."""
    eval_every: int = 50
    """Steps between evaluations (0: only at the end)."""
    eval_steps: int = 10
    """Held-out batches per evaluation (pretrain, dpo; the other stages evaluate their whole split)."""
    patience: int = 0
    """Stop after this many evaluations without improvement (0: never)."""
    save_best_only: bool = True
    """Publish the best-by-evaluation weights (false: the last step's)."""
    checkpoint_every: int = 50
    """Steps between resumable checkpoints."""
    log_every: int = 10
    resume: bool = True
    """Continue the stage's last checkpoint when this same config made it; any other is set aside."""
    resume_from: str | None = None
    """Or start from this training checkpoint: the way to extend a finished run (more max_steps)."""
    resume_optimizer: bool = True
    """With resume_from, false: a fresh optimizer and schedule (an automatic resume always continues them)."""

    def check(self, key: str) -> None:
        if self.max_steps and self.warmup_steps >= self.max_steps:  # (max_steps 0 trains nothing: no schedule)
            raise LmforgeError(f"config key '{key}.warmup_steps' ({self.warmup_steps}) must be smaller than "
                               f"'{key}.max_steps' ({self.max_steps})")
        if self.batch_size < 1 or self.grad_accum_steps < 1:
            raise LmforgeError(f"config keys '{key}.batch_size' and '{key}.grad_accum_steps' must be positive")

    @staticmethod
    def split(section: dict[str, Any]) -> tuple[dict, dict]:
        """Split a stage section into (shared training knobs, stage-specific knobs)."""
        names = {f.name for f in fields(TrainConfig)}
        return ({k: v for k, v in section.items() if k in names},
                {k: v for k, v in section.items() if k not in names})


@dataclass(kw_only=True)
class SFTConfig(TrainConfig):
    """Supervised fine-tuning; ``batch_size`` counts packed rows (or conversations, packing off)."""

    data: Any
    """null: the builtin task conversations | a record file, hub dataset or mapping."""
    packing: bool
    """Pack conversations into full rows (attention kept inside each)."""
    train_on_all: bool
    """Loss on prompts too, not only on the assistant turns."""
    lora: dict | None
    """null: full fine-tuning | LoRA/QLoRA adapters (LoraConfig)."""

    def check(self, key: str) -> None:
        super().check(key)
        check_lora(self.lora, key)


@dataclass(kw_only=True)
class RewardModelConfig(TrainConfig):
    """Bradley-Terry reward model; ``batch_size`` counts preference pairs (2 rows each)."""

    data: Any
    """null: the builtin preference pairs | a record file of pairs or rankings."""
    margin: float | None
    """Required reward gap for pairs whose data gives none (null: none)."""
    center_coef: float
    """Weight of the penalty that keeps rewards centred on 0."""
    lora: dict | None
    """LoRA/QLoRA adapters (the score head trains too), or null."""

    def check(self, key: str) -> None:
        super().check(key)
        check_lora(self.lora, key)


@dataclass(kw_only=True)
class DPOConfig(TrainConfig):
    """Direct preference optimisation; ``batch_size`` counts preference pairs per forward-backward pass."""

    data: Any
    """null: the builtin preference pairs | a record file of pairs or rankings."""
    on_policy: bool | str
    """false: static pairs | true: the scored on-policy pairs | mixed: both."""
    on_policy_share: float
    """mixed: share of on-policy pairs in the training stream."""
    reference: str | None
    """Frozen reference checkpoint (null: the SFT model)."""
    beta: float
    """Strength of the implicit KL to the reference."""
    loss_type: str
    """sigmoid | ipo | hinge | simpo | orpo (the last two reference-free)."""
    label_smoothing: float
    """Conservative DPO: assumed share of flipped labels (sigmoid and simpo losses only)."""
    rpo_alpha: float
    """Weight of the chosen answers' per-token NLL (RPO; 0: plain DPO)."""
    simpo_gamma_beta_ratio: float = 0.5
    """simpo: the target margin as a multiple of beta."""
    orpo_lambda: float = 0.1
    """orpo: weight of the odds-ratio term beside the NLL."""
    lora: dict | None
    """LoRA/QLoRA adapters (the reference is then the policy with them off), or null."""

    def check(self, key: str) -> None:
        super().check(key)
        if self.label_smoothing and self.loss_type not in ("sigmoid", "simpo"):
            raise LmforgeError(f"config key '{key}.label_smoothing' ({self.label_smoothing}) applies only to "
                               f"loss_type sigmoid or simpo, not {self.loss_type!r}")
        if self.rpo_alpha and self.loss_type == "orpo":
            raise LmforgeError(f"config key '{key}.rpo_alpha' ({self.rpo_alpha}): loss_type orpo already adds the "
                               f"chosen answers' NLL; set rpo_alpha to 0")
        if self.simpo_gamma_beta_ratio < 0:
            raise LmforgeError(f"config key '{key}.simpo_gamma_beta_ratio' ({self.simpo_gamma_beta_ratio}) must be "
                               f">= 0 (a negative target margin rewards preferring the rejected answer)")
        if self.orpo_lambda <= 0:
            raise LmforgeError(f"config key '{key}.orpo_lambda' ({self.orpo_lambda}) must be > 0 (0 is plain SFT "
                               f"on the chosen answers)")
        check_lora(self.lora, key)


@dataclass(kw_only=True)
class RolloutConfig(TrainConfig):
    """What PPO and GRPO share: ``rollout_batch_size`` prompts sampled per iteration, trained on
    ``batch_size`` prompts per optimizer step (no accumulation), ``ppo_epochs`` times over."""

    data: Any
    """null: the builtin RL prompts | a prompt record file."""
    reference: str | None
    """Frozen reference checkpoint (null: the SFT model)."""
    reward_fn: RewardSpec | dict
    """The reward's weights (a RewardSpec once checked)."""
    rollout_batch_size: int
    """Prompts sampled per iteration."""
    ppo_epochs: int
    """Passes over an iteration's rollouts."""
    max_new_tokens: int
    """Longest response sampled, in tokens."""
    temperature: float
    """Sampling temperature; log-probs are taken at the same temperature."""
    top_k: int
    """Sample among the k likeliest tokens (0: off)."""
    top_p: float
    """Nucleus sampling mass (1: off)."""
    lora: dict | None
    """LoRA/QLoRA adapters, or null."""

    @classmethod
    def from_dict(cls, section: dict[str, Any], key: str):
        # batch_size null: the whole iteration in one optimizer step.
        return super().from_dict({**section, "batch_size": section.get("batch_size") or section["rollout_batch_size"]},
                                 key)

    def check(self, key: str) -> None:
        super().check(key)
        if self.rollout_batch_size % self.batch_size:
            raise LmforgeError(f"config key '{key}.batch_size' ({self.batch_size}) must divide "
                               f"'{key}.rollout_batch_size' ({self.rollout_batch_size})")
        if self.grad_accum_steps != 1:
            raise LmforgeError(f"config key '{key}.grad_accum_steps' ({self.grad_accum_steps}) is not used by {key}: "
                               f"'{key}.rollout_batch_size' / '{key}.batch_size' set how an iteration is split; "
                               f"remove it")
        self.reward_fn = RewardSpec.from_dict(self.reward_fn, key=f"{key}.reward_fn")
        check_lora(self.lora, key)

    @property
    def n_minibatches(self) -> int:
        """Optimizer steps per pass over an iteration's rollouts."""
        return self.rollout_batch_size // self.batch_size

    @property
    def steps_per_iteration(self) -> int:
        return self.ppo_epochs * self.n_minibatches


@dataclass(kw_only=True)
class PPOConfig(RolloutConfig):
    """PPO with a value function; one sampled response (a rollout) per prompt."""

    missing_eos_penalty: float
    """Subtracted from the reward of a response that never emits <|end|>."""
    kl_coef: float
    """Weight of the per-token KL penalty (the initial value when adaptive)."""
    kl_estimator: str
    """k1 | k3."""
    kl_target: float | None
    """null: a fixed kl_coef | the adaptive controller's target KL."""
    kl_horizon: int
    """The adaptive controller's horizon, in rollouts."""
    gamma: float
    """Discount factor."""
    gae_lambda: float
    """GAE's lambda."""
    whiten_advantages: bool
    """Normalise an iteration's advantages to mean 0, std 1."""
    whiten_rewards: bool
    """Scale the per-token rewards by their std."""
    clip_range: float
    """Policy ratio clip: rho in [1 - clip_range, 1 + clip_range]."""
    clip_range_value: float
    """Value clip: a new value stays within this of the old one."""
    vf_coef: float
    """Weight of the value loss."""
    value_model: str
    """separate: a critic with its own trunk | shared: a value head on the policy."""
    score_position: str = "last_token"
    """last_token: the score on the last response token | after_eos: one step past <|end|>."""


@dataclass(kw_only=True)
class GRPOConfig(RolloutConfig):
    """GRPO: ``samples_per_prompt`` answers per prompt, advantages relative to their group."""

    samples_per_prompt: int
    """Answers sampled per prompt (the group)."""
    scale_rewards: str
    """group | batch | none: what a group's advantages are divided by."""
    clip_range: float
    """Lower ratio clip: rho >= 1 - clip_range."""
    clip_range_high: float | None
    """Upper ratio clip: rho <= 1 + clip_range_high (null: clip_range; resolved by check)."""
    beta: float
    """Weight of the k3 KL to the reference; 0: no reference at all."""
    loss_type: str
    """grpo | dr_grpo | dapo."""
    dapo_normalizer: str = "rollout"
    """dapo: rollout: divide by the iteration's tokens / its steps per pass (TRL) | minibatch: by the mini-batch's."""
    oversample: int = 1
    """Sample up to this many batches of prompts to find groups whose rewards differ."""
    step_reward: float = 0.0
    """Weight of the per-equation process advantage (0: outcome supervision only)."""

    def check(self, key: str) -> None:
        super().check(key)
        if self.samples_per_prompt < 2:
            # The baseline is the group's own mean, so a group of one always has advantage 0,
            # and under 'group' scaling its std is undefined as well.
            raise LmforgeError(
                f"config key '{key}.samples_per_prompt' is {self.samples_per_prompt} (with '{key}.scale_rewards': "
                f"{self.scale_rewards}): an advantage is a reward minus its group's mean, so a group of one sample "
                f"always has advantage 0 (and no std to scale by); use samples_per_prompt >= 2")
        for name, allowed in (("loss_type", GRPO_LOSS_TYPES), ("scale_rewards", GRPO_SCALE_REWARDS)):
            if getattr(self, name) not in allowed:
                raise LmforgeError(f"config key '{key}.{name}': {getattr(self, name)!r} is not allowed "
                                   f"(choose from {', '.join(allowed)})")
        if self.clip_range_high is None:
            self.clip_range_high = self.clip_range


@dataclass(kw_only=True)
class StarConfig(TrainConfig):
    """STaR rounds: sample, keep the verified answers, fine-tune; ``batch_size`` counts kept answers."""

    data: Any
    """null: the builtin RL prompts | a prompt record file (every prompt needs an answer)."""
    rounds: int
    """Sample-filter-train rounds; each samples from the previous round's model."""
    samples_per_prompt: int
    """Answers sampled per prompt."""
    n_prompts: int
    """Prompts sampled per round (a fresh slice of a seeded shuffle each round)."""
    max_new_tokens: int
    """Longest answer sampled, in tokens."""
    temperature: float
    """Sampling temperature (0: greedy)."""
    top_k: int
    """Sample among the k likeliest tokens (0: off)."""
    top_p: float
    """Nucleus sampling mass (1: off)."""
    sample_batch_size: int
    """Rows (prompt x sample) per generation batch: bounds the KV cache."""
    packing: bool
    """Pack kept answers into full rows | false: one per row."""

    def check(self, key: str) -> None:
        super().check(key)
        for name in ("rounds", "samples_per_prompt", "n_prompts", "max_new_tokens", "sample_batch_size"):
            value = getattr(self, name)
            if value < 1:
                raise LmforgeError(f"config key '{key}.{name}' is {value}; it must be at least 1")
        if self.temperature < 0:
            raise LmforgeError(f"config key '{key}.temperature' is {self.temperature}; it must be >= 0 (0: greedy)")


# --------------------------------------------------------------------------- sampling-only sections


@dataclass
class ScoreConfig(Section):
    """Reward scoring of the SFT model's samples."""

    data: Any
    """null: the builtin RL prompts | a prompt record file."""
    n_prompts: int
    """Prompts scored."""
    samples_per_prompt: int
    """Answers sampled per prompt (best vs worst gives an on-policy DPO pair)."""
    max_new_tokens: int
    """Longest answer sampled, in tokens."""
    temperature: float
    """Sampling temperature (0: greedy)."""
    top_k: int
    """Sample among the k likeliest tokens (0: off)."""
    top_p: float
    """Nucleus sampling mass (1: off)."""
    batch_size: int
    """Rows (prompt x sample) per forward pass when sampling and scoring."""
    reward_fn: RewardSpec | dict
    """The reward's weights (a RewardSpec once checked)."""

    def check(self, key: str) -> None:
        self.reward_fn = RewardSpec.from_dict(self.reward_fn, key=f"{key}.reward_fn")


@dataclass
class EvalConfig(Section):
    """Held-out comparison of the trained stages."""

    stages: list[str]
    """The stages compared."""
    n_prompts: int
    """Held-out prompts with checkable answers, answered greedily."""
    max_new_tokens: int
    """Longest answer generated, in tokens."""
    val_batches: int
    """Pretraining validation batches for perplexity and bits per byte."""
    n_samples: int
    """Sample responses shown per stage in the report."""
    samples_per_prompt: int
    """Temperature-1 samples per prompt for the sampled accuracy and pass@k (0: off)."""
    batch_size: int
    """Rows per forward pass (generation, reward scoring, validation windows)."""


# Every section with rules of its own; the others (seed, data, resources, ...) the schema checks alone.
SECTIONS: dict[str, Any] = {
    "tokenizer": TokenizerConfig,  # first: an init_from that conflicts with it is reported before its folder is read
    "model": ModelSection,
    "pretrain": TrainConfig,
    "sft": SFTConfig,
    "reward": RewardModelConfig,
    "score": ScoreConfig,
    "dpo": DPOConfig,
    "ppo": PPOConfig,
    "grpo": GRPOConfig,
    "star": StarConfig,
    "eval": EvalConfig,
}
