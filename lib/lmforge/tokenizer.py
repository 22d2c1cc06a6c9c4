"""Train or load a byte-level BPE tokenizer; special tokens; the chat template.

The chat template lives here, once: every stage (SFT, reward, DPO, PPO, GRPO,
eval, chat) renders conversations through ``render_chat`` / ``render_prompt``,
and the same format is written as a Jinja ``chat_template`` so that
``transformers`` renders identically after export.

Format::

    <|bos|><|system|>…<|end|><|user|>…<|end|><|assistant|>…<|end|>

The loss mask covers assistant content *and* its ``<|end|>``, so the model
learns to stop; generation stops at ``<|end|>``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Sequence

from lmforge.errors import LmforgeError
from lmforge.files import atomic_write_json, atomic_write_text

PAD, BOS, EOS, END = "<|pad|>", "<|bos|>", "<|eos|>", "<|end|>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {r: f"<|{r}|>" for r in ROLES}
SPECIAL_TOKENS = [PAD, BOS, EOS, END, *ROLE_TOKENS.values()]

# ``{% generation %}`` marks what ``render_chat``'s loss mask trains on (assistant content and its
# ``<|end|>``): transformers' ``return_assistant_tokens_mask`` then gives that mask, which TRL's
# assistant-only SFT needs. Rendering without the flag ignores the markers.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class LMTokenizer:
    """A ``tokenizers.Tokenizer`` plus the project's special tokens and chat format."""

    def __init__(self, tok):
        missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
        if missing:
            tok.add_special_tokens(missing)
        self.tok = tok
        self.pad_id, self.bos_id, self.eos_id, self.end_id = (
            tok.token_to_id(t) for t in (PAD, BOS, EOS, END))
        self.role_ids = {r: tok.token_to_id(t) for r, t in ROLE_TOKENS.items()}

    # ---- construction -------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              split_digits: bool = False) -> "LMTokenizer":
        """A byte-level BPE fitted on ``texts``. ``split_digits``: every digit is a token of its own
        (as Llama's tokenizer does), so a number's digits look the same wherever it stands."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if split_digits else byte_level)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_str(cls, text: str) -> "LMTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    @classmethod
    def load(cls, path_or_id: str | Path) -> "LMTokenizer":
        """A tokenizer.json file, a folder holding one, or a hub id."""
        from tokenizers import Tokenizer

        p = Path(path_or_id)
        if p.is_dir():
            p = p / "tokenizer.json"
        if p.exists():
            try:
                return cls(Tokenizer.from_file(str(p)))
            except Exception as e:  # tokenizers raises a bare Exception on bad JSON
                raise LmforgeError(f"{p}: not a valid tokenizer.json: {e}") from None
        if str(path_or_id).endswith(".json") or str(path_or_id).startswith((".", "/")):
            raise LmforgeError(f"tokenizer file not found: {path_or_id}")
        try:
            return cls(Tokenizer.from_pretrained(str(path_or_id)))
        except Exception as e:
            raise LmforgeError(f"could not load tokenizer '{path_or_id}' from the hub: {e}") from None

    # ---- identity ---------------------------------------------------------------
    def to_str(self) -> str:
        return self.tok.to_str()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_str().encode()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def save(self, folder: str | Path) -> None:
        """tokenizer.json + a tokenizer_config.json that ``transformers`` reads (chat template included)."""
        atomic_write_text(Path(folder) / "tokenizer.json", self.to_str())
        atomic_write_json(Path(folder) / "tokenizer_config.json", self.hf_config())

    def hf_config(self) -> dict:
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": END,
                "pad_token": PAD, "unk_token": None, "chat_template": CHAT_TEMPLATE,
                "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False}

    # ---- plain text ---------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def document(self, ids: list[int]) -> list[int]:
        """A pretraining document: BOS + text + EOS."""
        return [self.bos_id, *ids, self.eos_id]

    # ---- chat -----------------------------------------------------------------------
    def render_chat(self, messages: Sequence[dict], *, where: str = "conversation") -> tuple[list[int], list[int]]:
        """Token ids of a whole conversation and its assistant-only loss mask (1 = train on it)."""
        ids, mask = [self.bos_id], [0]
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in ROLE_TOKENS:
                raise LmforgeError(f"{where}: message {i} has role {role!r} (expected one of {', '.join(ROLES)})")
            if not isinstance(content, str):
                raise LmforgeError(f"{where}: message {i} has no text 'content'")
            body = self.encode(content) + [self.end_id]
            ids += [self.role_ids[role], *body]
            mask += [0] + [int(role == "assistant")] * len(body)
        return ids, mask

    def render_prompt(self, messages: Sequence[dict], *, where: str = "conversation") -> list[int]:
        """Ids that end with ``<|assistant|>``: what a model continues to answer."""
        ids, _ = self.render_chat(messages, where=where)
        return ids + [self.role_ids["assistant"]]

    def prompt_ids(self, prompt: str) -> list[int]:
        """The generation prompt for a single user message."""
        return self.render_prompt([{"role": "user", "content": prompt}])


def bytes_per_token(tok: LMTokenizer, texts: Sequence[str]) -> float:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    return n_bytes / max(n_tokens, 1)
