"""The ``model:`` section as the transformer's architecture: sizes, options and the rules between them.

Torch-free, so that checking a config (and building the Snakemake DAG) never
imports torch; ``lmforge.model`` builds the network from a ``ModelConfig``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from lmforge.errors import LmforgeError

POSITIONAL_ENCODINGS = ("rope", "yarn", "alibi", "sinusoidal", "learned")
ATTENTION_TYPES = ("mha", "mqa", "gqa")
NORM_TYPES = ("rmsnorm", "layernorm")
ACTIVATIONS = ("swiglu", "gelu", "relu", "silu", "leaky_relu")


@dataclass
class ModelConfig:
    """Architecture of the decoder-only transformer (the ``model:`` config section)."""

    vocab_size: int = 2048
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    """None follows attention_type (mha: n_heads, mqa: 1); gqa needs it set."""
    d_ff: int | None = None
    """None: swiglu rounds 8/3*d_model up to a multiple of 64; other activations use 4*d_model."""
    max_seq_len: int = 256
    dropout: float = 0.0
    positional_encoding: str = "rope"
    """rope | yarn | alibi | sinusoidal | learned"""
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0
    """yarn: context extension factor s."""
    original_max_seq_len: int | None = None
    """yarn: the context the model was trained at."""
    attention_type: str = "gqa"
    """mha | mqa | gqa"""
    sliding_window: int | None = None
    """None/0: full causal; w: each token sees the last w tokens (itself included)."""
    attention_bias: bool = False
    """Bias on q/k/v projections (Qwen2-style); o_proj never has one."""
    norm_type: str = "rmsnorm"
    """rmsnorm | layernorm"""
    norm_eps: float = 1e-5
    activation: str = "swiglu"
    """swiglu | gelu | relu | silu | leaky_relu"""
    tie_embeddings: bool = True

    # ---- derived sizes (the None defaults resolved)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads after resolving ``n_kv_heads=None``."""
        if self.n_kv_heads is not None:
            return self.n_kv_heads
        return 1 if self.attention_type == "mqa" else self.n_heads

    @property
    def ff_dim(self) -> int:
        """The MLP hidden size after resolving ``d_ff=None``."""
        if self.d_ff is not None:
            return self.d_ff
        if self.activation == "swiglu":
            # 8/3*d keeps swiglu's three matrices at the parameter count of a 4*d two-matrix MLP.
            return 64 * math.ceil(int(8 * self.d_model / 3) / 64)
        return 4 * self.d_model

    @property
    def window(self) -> int | None:
        """The sliding window, with 0 normalised to None (full causal attention)."""
        return self.sliding_window or None

    # ---- validation and (de)serialisation

    def validate(self) -> "ModelConfig":
        """Check every field and the rules between fields; raise LmforgeError naming ``model.<key>``."""
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            _check_positive_int(key, getattr(self, key))
        for key in ("n_kv_heads", "d_ff", "original_max_seq_len"):
            if getattr(self, key) is not None:
                _check_positive_int(key, getattr(self, key))
        if self.sliding_window is not None:
            _check_int(self.sliding_window, "sliding_window")
            if self.sliding_window < 0:
                raise LmforgeError(f"model.sliding_window ({self.sliding_window}) must be >= 0 (0 or null = no window)")
        _check_choice("positional_encoding", self.positional_encoding, POSITIONAL_ENCODINGS)
        _check_choice("attention_type", self.attention_type, ATTENTION_TYPES)
        _check_choice("norm_type", self.norm_type, NORM_TYPES)
        _check_choice("activation", self.activation, ACTIVATIONS)
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise LmforgeError(f"model.dropout ({self.dropout!r}) must be a number in [0, 1)")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise LmforgeError(f"model.norm_eps ({self.norm_eps!r}) must be a positive number")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise LmforgeError(f"model.rope_theta ({self.rope_theta!r}) must be a positive number")
        for key in ("attention_bias", "tie_embeddings"):
            if not isinstance(getattr(self, key), bool):
                raise LmforgeError(f"model.{key} ({getattr(self, key)!r}) must be true or false")

        if self.d_model % self.n_heads:
            raise LmforgeError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        self._validate_kv_heads()
        if self.positional_encoding in ("rope", "yarn") and self.head_dim % 2:
            raise LmforgeError(
                f"model.positional_encoding '{self.positional_encoding}' rotates pairs of dimensions, so the "
                f"head dim model.d_model / model.n_heads ({self.d_model}/{self.n_heads} = {self.head_dim}) must be even")
        if self.positional_encoding == "sinusoidal" and self.d_model % 2:
            raise LmforgeError(f"model.positional_encoding 'sinusoidal' needs an even model.d_model ({self.d_model})")
        if self.window is not None and self.window > self.max_seq_len:
            raise LmforgeError(
                f"model.sliding_window ({self.sliding_window}) is larger than model.max_seq_len ({self.max_seq_len})")
        if self.positional_encoding == "yarn":
            if self.original_max_seq_len is None:
                raise LmforgeError(
                    "model.positional_encoding 'yarn' needs model.original_max_seq_len "
                    "(the context length the model was trained at)")
            if not (isinstance(self.rope_scaling_factor, (int, float)) and self.rope_scaling_factor >= 1):
                raise LmforgeError(
                    f"model.positional_encoding 'yarn' needs model.rope_scaling_factor >= 1 "
                    f"(got {self.rope_scaling_factor!r})")
        return self

    def _validate_kv_heads(self) -> None:
        kv = self.n_kv_heads
        if self.attention_type == "mha" and kv not in (None, self.n_heads):
            raise LmforgeError(
                f"model.attention_type 'mha' needs model.n_kv_heads null or equal to model.n_heads "
                f"({self.n_heads}), got {kv}")
        if self.attention_type == "mqa" and kv not in (None, 1):
            raise LmforgeError(f"model.attention_type 'mqa' needs model.n_kv_heads null or 1, got {kv}")
        if self.attention_type == "gqa" and kv is None:
            raise LmforgeError(
                "model.attention_type 'gqa' needs model.n_kv_heads set (a divisor of model.n_heads)")
        if self.n_heads % self.kv_heads:
            raise LmforgeError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.kv_heads})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build and validate a config; unknown keys are an error (they are usually typos)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LmforgeError(
                f"unknown key(s) in the model config: {', '.join('model.' + k for k in unknown)} "
                f"(known keys: {', '.join(sorted(known))})")
        return cls(**d).validate()

    @classmethod
    def from_section(cls, section: dict) -> "ModelConfig":
        """The pipeline config's model section as an architecture: ``init_from`` (where the weights
        come from, not a shape) set aside."""
        return cls.from_dict({k: v for k, v in section.items() if k != "init_from"})


def _check_int(value, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LmforgeError(f"model.{key} ({value!r}) must be an integer")


def _check_positive_int(key: str, value) -> None:
    _check_int(value, key)
    if value < 1:
        raise LmforgeError(f"model.{key} ({value}) must be a positive integer")


def _check_choice(key: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise LmforgeError(f"model.{key} ({value!r}) must be one of: {', '.join(allowed)}")
