"""Sampling with the KV cache: temperature, top-k, top-p, stop tokens, batched prompts.

Prompts of unequal length are left-padded so every row's next token sits in the
same column; a key-padding mask hides the pads and position ids count only real
tokens, so a row's tokens are the ones it would get alone. One preallocated
cache per batch: the prompt is run once (prefill), then one token per step.

``compile=True`` runs each decoding step (embedding, blocks, final norm, lm_head
and, when greedy, the argmax and its log-prob) through torch.compile
(``Transformer.static_step``): the cache is allocated at a power-of-two length and
only the number of attended columns varies, as the one dynamic size of the graph, so
one graph per (model, batch size, cache-length bucket, greedy or sampled, padded or
not) serves every step and every later call; the prefill stays eager. A compile
costs seconds, so it pays only for long generations (bench/RESULTS.md). Models with
adapter or quantized layers (LoRA, NF4) decode eagerly even with compile=True.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model import Transformer, padded_position_ids


@dataclass
class GenerationOutput:
    tokens: list[list[int]]
    """Completion ids per prompt (the stop token included when hit)."""
    logprobs: list[torch.Tensor]
    """Per completion token, its log-prob under log_softmax(logits / temperature) (greedy: temperature 1)."""
    finished: list[bool]
    """Whether the row reached a stop token (False: it ran out of max_new_tokens or context)."""


def sample_next_token(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row from logits (B, V). Returns (tokens (B,), their log-probs (B,)).

    The log-prob is under the unfiltered distribution at this temperature (what a
    policy-gradient method needs); top-k/top-p only restrict what may be drawn.
    temperature 0 is greedy (argmax), scored at temperature 1.
    """
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        logp = F.log_softmax(logits, dim=-1)
    else:
        logits = logits / temperature
        logp = F.log_softmax(logits, dim=-1)
        probs = F.softmax(_filter(logits, top_k, top_p), dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the smallest set with probability >= top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p (the top one always stays).
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _check_args(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if max_new_tokens < 0:
        raise LmforgeError(f"max_new_tokens ({max_new_tokens}) must be >= 0")
    if temperature < 0:
        raise LmforgeError(f"temperature ({temperature}) must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise LmforgeError(f"top_k ({top_k}) must be >= 0 (0 = off)")
    if not 0.0 < top_p <= 1.0:
        raise LmforgeError(f"top_p ({top_p}) must be in (0, 1]")


def _budgets(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[int]:
    """New tokens each prompt may get: max_new_tokens capped by the context left after it."""
    limit = model.cfg.max_seq_len
    budgets = []
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise LmforgeError(f"prompt {i} is empty; generation needs at least one token to condition on")
        if len(p) > limit:
            raise LmforgeError(f"prompt {i} has {len(p)} tokens, more than model.max_seq_len ({limit})")
        budgets.append(min(max_new_tokens, limit - len(p)))
    return budgets


@torch.inference_mode()  # lighter than no_grad per op; what is yielded is only read (stacked, compared)
def _decode(model: Transformer, prompts: Sequence[Sequence[int]], budgets: list[int], *, temperature: float,
            top_k: int, top_p: float, stop_ids: Sequence[int], pad_id: int,
            generator: torch.Generator | None,
            compile: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield, per step, (tokens (B,), logprobs (B,), emitted (B,) bool, hit_stop (B,) bool) for one batch.

    Rows that are done (stop token or budget reached) get pad tokens that the
    mask hides, and the loop ends when every row is done. Prompts of equal length
    take a maskless path: nothing is padded, and a finished row's later tokens are
    junk nobody reads (rows never attend to each other), so no mask is built or updated.
    compile: the steps after the (eager) prefill run ``_static_step`` through torch.compile.
    """
    device = model.embed_tokens.weight.device
    B, P, steps = len(prompts), max(len(p) for p in prompts), max(budgets)
    if steps == 0:
        return
    padded = any(len(p) != P for p in prompts)
    static = compile and _compilable(model)
    # The last sampled token is never fed back; a static cache is rounded up so that other lengths share its graph.
    length = _bucket(P + steps - 1, model.cfg.max_seq_len) if static else P + steps - 1
    # The mask covers the whole run up front: prompt columns now, one column per step later.
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.zeros(B, length, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, P - len(p):P] = True
    ids, mask = ids.to(device), mask.to(device)
    budget = torch.tensor(budgets, device=device)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    no_stop = torch.zeros(B, dtype=torch.bool, device=device)

    cache = model.new_cache(B, length)
    if padded:
        positions = padded_position_ids(mask[:, :P])
        logits = _last_logits(model, ids, positions, mask[:, :P], cache)
        next_pos = positions[:, -1:] + 1  # (B, 1)
    else:
        logits = _last_logits(model, ids, None, None, cache)
    sample = functools.partial(sample_next_token, temperature=temperature, top_k=top_k, top_p=top_p,
                               generator=generator)
    if static:
        step_fn = _compiled_step()
        greedy = temperature == 0
        columns = torch.arange(length, device=device)
    tokens, logprobs = sample(logits)
    done = budget == 0
    for step in range(steps):
        emitted = ~done
        hit_stop = emitted & torch.isin(tokens, stops) if len(stop_ids) else no_stop
        yield tokens, logprobs, emitted, hit_stop
        done = done | hit_stop | (budget <= step + 1)
        # Without stop tokens only the budgets end rows, and the largest one ends the loop:
        # no need to ask the device every step.
        if step + 1 == steps or (len(stop_ids) and bool(done.all())):
            return
        if padded:
            mask[:, P + step] = ~done
            tokens = torch.where(done, torch.full_like(tokens, pad_id), tokens)
        if static:
            cache.columns = columns[:P + step + 1]
            torch._dynamo.mark_dynamic(cache.columns, 0)  # its length: the one size that changes
            out = step_fn(model, tokens, cache, next_pos if padded else None, mask if padded else None, greedy)
            tokens, logprobs = out if greedy else sample(out)
        elif padded:
            tokens, logprobs = sample(_last_logits(model, tokens[:, None], next_pos, mask[:, :P + step + 1], cache))
        else:
            tokens, logprobs = sample(_last_logits(model, tokens[:, None], None, None, cache))
        if padded:
            # Finished rows keep feeding hidden pads; clamping keeps their positions inside the tables.
            next_pos = (next_pos + 1).clamp(max=model.cfg.max_seq_len - 1)


def _last_logits(model: Transformer, ids, positions, mask, cache) -> torch.Tensor:
    """Logits (B, V) at the last column only: the vocab projection of the prompt would be wasted work."""
    h = model.hidden_states(ids, position_ids=positions, key_padding_mask=mask, cache=cache)
    return model.next_logits(h[:, -1])


def _compilable(model: Transformer) -> bool:
    """Plain embedding and linear layers only: adapter and quantized layers (LoRA, NF4) decode eagerly."""
    linears = [model.lm_head] + [m for layer in model.layers for m in (*layer.self_attn.children(),
                                                                      *layer.mlp.children())
                                 if not isinstance(m, nn.Dropout)]
    return type(model.embed_tokens) is nn.Embedding and all(type(m) is nn.Linear for m in linears)


def _bucket(n: int, limit: int) -> int:
    """n rounded up to a power of two (at least 64), but never past the context limit (n <= limit)."""
    return max(n, min(limit, max(64, 1 << (n - 1).bit_length())))


def _static_step(model: Transformer, tokens: torch.Tensor, cache, positions: torch.Tensor | None,
                 key_mask: torch.Tensor | None, greedy: bool):
    """Feed tokens (B,) at the last of cache.columns: greedy (next tokens (B,), their log-probs (B,)),
    else logits (B, V). positions (B, 1) and key_mask (B, cache length) for padded batches, else None."""
    h = model.static_step(tokens[:, None], cache, position_ids=positions, key_padding_mask=key_mask)
    logits = model.next_logits(h[:, -1])
    return sample_next_token(logits, temperature=0) if greedy else logits


@functools.cache
def _compiled_step() -> Callable:
    """``_static_step`` through torch.compile, built on first use. dynamic=False: every size is fixed but
    the attended length (``mark_dynamic`` in _decode); a new batch size or cache length gets its own graph.
    torch.compile keeps each graph with its guards (the model object, config values, shapes), so a later
    call that passes them reuses it; past torch._dynamo's recompile limit (8 graphs) steps run eagerly."""
    return torch.compile(_static_step, dynamic=False)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] = (), pad_id: int = 0,
             generator: torch.Generator | None = None, batch_size: int | None = None,
             compile: bool = False) -> GenerationOutput:
    """Complete every prompt (lists of token ids) with up to max_new_tokens tokens.

    Prompts are processed in order, batch_size at a time (default: all at once).
    The same generator seed gives the same samples. The model runs in eval mode
    and gets its previous mode back afterwards. compile: decoding steps through
    torch.compile (see the module docstring; on CPU it needs a C++ compiler); greedy
    tokens are the eager ones, sampled ones the same for the same generator seed.
    """
    _check_args(max_new_tokens, temperature, top_k, top_p)
    budgets = _budgets(model, prompts, max_new_tokens)
    batch_size = batch_size or max(len(prompts), 1)
    out = GenerationOutput(tokens=[], logprobs=[], finished=[])
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            _generate_batch(model, prompts[chunk], budgets[chunk], out, temperature=temperature, top_k=top_k,
                            top_p=top_p, stop_ids=stop_ids, pad_id=pad_id, generator=generator,
                            compile=compile)
    finally:
        model.train(was_training)
    return out


def _generate_batch(model, prompts, budgets, out: GenerationOutput, **kw) -> None:
    """Run one batch and append its rows to out."""
    toks, lps, emits, finished = [], [], [], None
    for tokens, logprobs, emitted, hit_stop in _decode(model, prompts, budgets, **kw):
        toks.append(tokens)
        lps.append(logprobs)
        emits.append(emitted)
        finished = hit_stop if finished is None else finished | hit_stop  # stays on the device until the end
    if not toks:
        out.tokens += [[] for _ in prompts]
        out.logprobs += [torch.zeros(0) for _ in prompts]
        out.finished += [False] * len(prompts)
        return
    # Emitted tokens of a row form a prefix of its columns (done is sticky).
    tokens, logprobs = torch.stack(toks, 1).cpu(), torch.stack(lps, 1).float().cpu()
    lengths = torch.stack(emits, 1).sum(1).cpu()
    finished = finished.cpu()
    for i, n in enumerate(lengths.tolist()):
        out.tokens.append(tokens[i, :n].tolist())
        out.logprobs.append(logprobs[i, :n])
        out.finished.append(bool(finished[i]))


@torch.no_grad()
def stream(model: Transformer, prompt_ids: Sequence[int], *, max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
           generator: torch.Generator | None = None, compile: bool = False) -> Iterator[int]:
    """Yield the completion of one prompt a token at a time (the stop token, when hit, is yielded last).

    Same tokens as ``generate`` with the same arguments and seed (compile as there).
    """
    _check_args(max_new_tokens, temperature, top_k, top_p)
    budgets = _budgets(model, [prompt_ids], max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        for tokens, _, _, _ in _decode(model, [prompt_ids], budgets, temperature=temperature, top_k=top_k,
                                       top_p=top_p, stop_ids=stop_ids, pad_id=0, generator=generator,
                                       compile=compile):
            yield int(tokens[0])
    finally:
        model.train(was_training)
