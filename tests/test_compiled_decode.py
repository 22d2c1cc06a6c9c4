"""Compiled decoding (generate(..., compile=True)) against the eager path and a no-cache reference.

Most tests run the static step uncompiled (the algorithm: a preallocated cache written at
the columns a tensor names, positions and masks from tensors); the slow ones compile it,
a few seconds per graph.
"""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import lmforge.generate as gen
import lmforge.kernels as kernels
from lmforge.generate import generate, stream
from lmforge.lora import LoraConfig, apply_lora
from lmforge.model import ModelConfig, Transformer
from lmforge.quant import quantize_model
from test_generate import make_model as sharpened_model
from test_speed_paths import ref_greedy

V = 53
EQUAL = [[5, 9, 2, 7], [7, 1, 4, 4], [12, 30, 6, 6]]
PADDED = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 11], [12, 30, 6, 6, 2]]
ARCHS = {"rope-gqa": {}, "alibi-window": dict(positional_encoding="alibi", sliding_window=6),
         "learned-mqa": dict(positional_encoding="learned", attention_type="mqa", n_kv_heads=None),
         "sinusoidal-window": dict(positional_encoding="sinusoidal", sliding_window=4),
         "yarn-bias-tied": dict(positional_encoding="yarn", rope_scaling_factor=2.0, original_max_seq_len=16,
                                  attention_bias=True, tie_embeddings=True)}


def make_model(seed: int = 0, **overrides) -> Transformer:
    """test_generate's tiny sharpened model, untied by default (no mere copy of the input)."""
    return sharpened_model(seed, **{"tie_embeddings": False, **overrides})


@pytest.fixture
def uncompiled_static(monkeypatch):
    """compile=True takes the static path, but its step runs eagerly; returns a list counting the steps."""
    calls = []

    def step(*args):
        calls.append(1)
        return gen._static_step(*args)

    monkeypatch.setattr(gen, "_compiled_step", lambda: step)
    return calls


def test_cache_length_buckets():
    assert [gen._bucket(n, 256) for n in (1, 39, 64, 65, 159, 255)] == [64, 64, 64, 128, 256, 256]
    assert gen._bucket(150, 180) == 180  # never past the context
    assert gen._bucket(20, 32) == 32


@torch.inference_mode()
def test_decoding_products_equal_f_linear():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 2, 32, generator=g), torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    for rows in (x, x[:1, :1]):  # a few rows (oneDNN on CPU), one row (torch.mv)
        torch.testing.assert_close(kernels.linear_no_grad(rows, w, b), F.linear(rows, w, b))
        torch.testing.assert_close(kernels.linear_no_grad(rows, w), F.linear(rows, w))
    if kernels._ONEDNN:  # the op compiled graphs call
        torch.testing.assert_close(torch.ops.lmforge.onednn_linear(x, w, b), F.linear(x, w, b))
        torch.library.opcheck(torch.ops.lmforge.onednn_linear.default, (x, w, None))


@pytest.mark.parametrize("arch", list(ARCHS.values()), ids=list(ARCHS))
def test_static_steps_give_the_tokens_and_logprobs_of_the_growing_cache(arch, uncompiled_static):
    model = make_model(**arch)
    for prompts in (EQUAL, PADDED):
        free = [ref_greedy(model, p, 10) for p in prompts]
        stop = free[1][2]  # row 1 stops after 3 tokens; the others whenever they emit it
        for stop_ids in ((), (stop,)):
            eager = generate(model, prompts, max_new_tokens=10, temperature=0, stop_ids=stop_ids)
            n = len(uncompiled_static)
            static = generate(model, prompts, max_new_tokens=10, temperature=0, stop_ids=stop_ids, compile=True)
            assert len(uncompiled_static) > n  # the static path ran
            assert static.tokens == eager.tokens == [ref_greedy(model, p, 10, stop_ids) for p in prompts]
            assert static.finished == eager.finished
            for a, b in zip(static.logprobs, eager.logprobs):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_static_sampling_draws_what_eager_sampling_draws(uncompiled_static):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32))
    kw = dict(max_new_tokens=9, temperature=1.5, top_k=20, top_p=0.95)
    eager = generate(model, PADDED, generator=torch.Generator().manual_seed(5), **kw)
    static = generate(model, PADDED, generator=torch.Generator().manual_seed(5), compile=True, **kw)
    assert static.tokens == eager.tokens and len(uncompiled_static) == 8
    assert eager.tokens != generate(model, PADDED, max_new_tokens=9, temperature=0).tokens  # really sampled
    for a, b in zip(static.logprobs, eager.logprobs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_static_cache_may_be_longer_than_the_run(uncompiled_static):
    """Columns past the written ones hold zeros, which would get scores of 0 if attended."""
    model = make_model(max_seq_len=128)
    out = generate(model, [EQUAL[0]], max_new_tokens=3, temperature=0, compile=True)  # cache of 64 for 6 tokens
    assert out.tokens == [ref_greedy(model, EQUAL[0], 3)]


@pytest.mark.parametrize("kind", ["lora", "nf4"])
def test_adapter_and_quantized_models_decode_eagerly(kind, monkeypatch):
    model = make_model()
    if kind == "lora":
        apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_()
    else:
        quantize_model(model)
    monkeypatch.setattr(gen, "_compiled_step", lambda: pytest.fail("compiled a model with adapter layers"))
    eager = generate(model, PADDED, max_new_tokens=6, temperature=0)
    assert generate(model, PADDED, max_new_tokens=6, temperature=0, compile=True).tokens == eager.tokens


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory):
    """One fresh inductor cache for this file's compiles (so no test depends on an earlier run's)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
    yield
    mp.undo()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.integration  # torch.compile: inductor builds C++ with the system compiler
def test_compiled_greedy_gives_the_eager_tokens_and_reuses_its_graphs(inductor_cache):
    model = make_model()
    eager = generate(model, EQUAL, max_new_tokens=12, temperature=0)
    before = graphs()
    out = generate(model, EQUAL, max_new_tokens=12, temperature=0, compile=True)
    assert graphs() == before + 1 and not counters["graph_break"]  # one graph for the whole step
    assert out.tokens == eager.tokens == [ref_greedy(model, p, 12) for p in EQUAL]
    for a, b in zip(out.logprobs, eager.logprobs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Another prompt length and budget in the same cache bucket (64): the same graph, no compile.
    again = generate(model, [p + [3] for p in EQUAL], max_new_tokens=20, temperature=0, compile=True)
    assert graphs() == before + 1
    assert again.tokens == [ref_greedy(model, p + [3], 20) for p in EQUAL]
    # One row (stream): its own graph, the same tokens as eager decoding.
    assert list(stream(model, EQUAL[1], max_new_tokens=12, temperature=0, compile=True)) == eager.tokens[1]
    assert graphs() == before + 2


@pytest.mark.integration  # torch.compile: inductor builds C++ with the system compiler
def test_compiled_padded_batch_with_a_stop_token(inductor_cache):
    model = make_model(**ARCHS["alibi-window"])
    free = [ref_greedy(model, p, 10) for p in PADDED]
    stop = free[1][2]
    expected = [ref_greedy(model, p, 10, [stop]) for p in PADDED]
    before = graphs()
    out = generate(model, PADDED, max_new_tokens=10, temperature=0, stop_ids=[stop], compile=True)
    assert graphs() == before + 1
    assert out.tokens == expected and len({len(t) for t in expected}) == 2  # row 1 stops early
    assert out.finished == [stop in t for t in expected]
