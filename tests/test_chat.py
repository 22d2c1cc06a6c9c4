"""`lmforge chat` in a real pseudo-terminal, and the sampling options of chat and generate."""
import io
import os
import pty
import select
import signal
import sys
import time

import pytest
import torch

from lmforge import cli
from lmforge.checkpoint import save_model
from lmforge.cli import main
from lmforge.model import ModelConfig, RewardModel, Transformer
from lmforge.tokenizer import LMTokenizer

MODEL = dict(vocab_size=320, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=64, tie_embeddings=False)
REPLY = "The number 7 is odd."
TIMEOUT = 120  # seconds for any one wait on the child (a loaded 2-core machine imports torch slowly)


@pytest.fixture(scope="module")
def tok():
    texts = [f"The number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(300)]
    return LMTokenizer.train(texts, vocab_size=300)


def scripted_model(tok: LMTokenizer) -> Transformer:
    """A model whose greedy answer to anything is REPLY, then <|end|>.

    With the blocks' output projections zeroed the last hidden state is the normalised
    embedding of the last token, sqrt(D)·ê(t); giving lm_head row next(t) the unit vector ê(t)
    makes next(t) the argmax (logit sqrt(D) against sqrt(D)·cos for the other rows).
    """
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(MODEL))
    chain = [tok.role_ids["assistant"], *tok.encode(REPLY), tok.end_id]
    assert len(set(chain)) == len(chain)  # each token has one successor
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.embed_tokens.weight
        model.lm_head.weight.zero_()
        for t, nxt in zip(chain, chain[1:]):
            model.lm_head.weight[nxt] = emb[t] / emb[t].norm()
    return model


@pytest.fixture(scope="module")
def checkpoint(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "model.pt"
    model = scripted_model(tok)
    save_model(path, model, kind="causal_lm", model_config=model.cfg.to_dict(), tokenizer=tok, meta={"stage": "sft"})
    return path


# --------------------------------------------------------------------------- pseudo-terminal


class Terminal:
    """`python -m lmforge.cli ARGS` with a pty as its controlling terminal (so Ctrl-C is SIGINT)."""

    def __init__(self, *args: str, sigint_ignored: bool = False):
        env = {**os.environ, "TERM": "dumb", "OMP_NUM_THREADS": "1"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: never return into pytest
            try:
                if sigint_ignored:  # as a background job of a non-interactive shell (make, CI) starts
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                os.execve(sys.executable, [sys.executable, "-m", "lmforge.cli", *args], env)
            finally:
                os._exit(127)
        self.out = b""

    def read_until(self, text: str, start: int = 0) -> int:
        """Read until ``text`` appears in the output after ``start``; return where it ends."""
        deadline = time.monotonic() + TIMEOUT
        while (i := self.out.find(text.encode(), start)) < 0:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {text!r}; output so far: {self.out!r}"
            if select.select([self.fd], [], [], left)[0]:
                chunk = self._read()
                assert chunk, f"the chat exited before printing {text!r}; output: {self.out!r}"
        return i + len(text)

    def type(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self) -> int:
        """Drain the output until the child exits; return its exit code."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if select.select([self.fd], [], [], 0.2)[0]:
                self._read()
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while self._read():
                    pass
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        pytest.fail(f"the chat did not exit; output: {self.out!r}")

    def _read(self) -> bytes:
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:  # EIO: the child closed its end
            chunk = b""
        self.out += chunk
        return chunk


@pytest.mark.integration  # the CLI in a pseudo-terminal, a child process
def test_chat_streams_a_reply_and_exits_cleanly_on_ctrl_d(checkpoint):
    term = Terminal("chat", str(checkpoint), "--temperature", "0", "--max-new-tokens", "12")
    prompt_end = term.read_until("you> ")
    term.type(b"hello there\r")
    reply_start = term.read_until("model> ", prompt_end)
    reply_end = term.read_until(REPLY, reply_start)
    assert term.out[reply_start:reply_end] == REPLY.encode()  # nothing between the prefix and the reply
    term.read_until("you> ", reply_end)  # the reply ended with a newline and the next prompt
    term.type(b"\x04")  # Ctrl-D on an empty line: end of input
    assert term.wait() == 0
    assert b"Traceback" not in term.out and b"Error" not in term.out


def wait_until_blocked(pid: int, settle: float = 0.5) -> None:
    """Return once the process has been asleep (state S in /proc/PID/stat) for ``settle`` seconds."""
    deadline, since = time.monotonic() + TIMEOUT, None
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        now = time.monotonic()
        since = (since or now) if state == "S" else None
        if since is not None and now - since >= settle:
            return
        time.sleep(0.05)
    pytest.fail("the chat never blocked waiting for input")


@pytest.mark.integration
@pytest.mark.parametrize("sigint_ignored", [False, True])
def test_chat_exits_cleanly_on_ctrl_c(checkpoint, sigint_ignored):
    term = Terminal("chat", str(checkpoint), "--temperature", "0", sigint_ignored=sigint_ignored)
    term.read_until("you> ")
    term.type(b"half a questi")
    # Let the child get from printing the prompt into its blocking read: a SIGINT that lands
    # between the two is only noticed when the read returns (CPython's input()). On a busy
    # machine a fixed sleep is not enough: wait until the process sleeps in the kernel.
    wait_until_blocked(term.pid)
    term.type(b"\x03")  # Ctrl-C: the terminal sends SIGINT
    assert term.wait() == 0
    assert b"Traceback" not in term.out and b"KeyboardInterrupt" not in term.out


# --------------------------------------------------------------------------- in-process


class Recorder(io.StringIO):
    """stdout that remembers what each flush delivered."""

    def __init__(self):
        super().__init__()
        self.flushed: list[str] = []
        self._mark = 0

    def flush(self):
        self.flushed.append(self.getvalue()[self._mark:])
        self._mark = len(self.getvalue())


def test_chat_flushes_each_token_as_it_is_sampled(checkpoint, monkeypatch):
    lines = iter(["hi"])

    def fake_input(prompt):
        print(prompt, end="", flush=True)
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = Recorder()
    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["chat", str(checkpoint), "--temperature", "0"]) == 0
    assert out.getvalue() == f"you> model> {REPLY}\nyou> \n"
    # One flush per token: 'The', ' number', ' 7', ' is', ' odd', '.' each reach the terminal on their own.
    start = out.flushed.index("model> ") + 1
    assert out.flushed[start:start + 6] == ["The", " number", " 7", " is", " odd", "."]


def test_chat_prompt_leaves_room_for_the_reply(tok):
    # The default max_new_tokens (256) is larger than this model's whole context (64).
    history = [{"role": "user", "content": "The number 7 is odd."}]
    ids = cli._chat_prompt(tok, history, max_seq_len=64, max_new_tokens=256)
    assert ids == tok.render_prompt(history) and len(ids) <= 32
    # A long conversation drops its oldest exchanges, keeping the latest question whole.
    long = [{"role": r, "content": f"The number {i} is odd."} for i in range(9) for r in ("user", "assistant")][:-1]
    ids = cli._chat_prompt(tok, long, max_seq_len=64, max_new_tokens=256)
    assert len(ids) <= 32 and ids[0] == tok.bos_id and ids[-1] == tok.role_ids["assistant"]
    assert tok.decode(ids).endswith("The number 8 is odd.")
    # A single message longer than the room keeps its last tokens.
    huge = [{"role": "user", "content": " ".join(["odd"] * 100)}]
    assert cli._chat_prompt(tok, huge, 64, 16) == tok.render_prompt(huge)[-48:]


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_sampling_defaults(command, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, f"cmd_{command}", lambda args: seen.update(vars(args)))
    assert main([command, "model.pt", *(["--prompt", "hi"] if command == "generate" else [])]) == 0
    assert (seen["temperature"], seen["top_p"], seen["top_k"], seen["max_new_tokens"]) == (0.7, 0.9, 0, 256)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_reward_model_checkpoint_is_refused(command, tok, tmp_path, capsys):
    cfg = ModelConfig.from_dict(MODEL)
    path = tmp_path / "reward.pt"
    save_model(path, RewardModel(Transformer(cfg)), kind="reward_model", model_config=cfg.to_dict(),
               tokenizer=tok, meta={"stage": "reward"})
    assert main([command, str(path), *(["--prompt", "hi"] if command == "generate" else [])]) == 1
    captured = capsys.readouterr()
    assert f"{path}: is a reward_model checkpoint" in captured.err and "causal language model" in captured.err
    assert "Traceback" not in captured.err and "you>" not in captured.out
