"""The embedded default data: made on the spot, deterministically, offline.

Two kinds of data, both built from what every Python install carries:

- Pretraining text (`pretrain_documents`): the docstrings of the public
  standard library (modules, classes, functions, methods) and the pydoc help
  topics, about 2 MB of real English prose. It varies with the Python
  version, so callers record `corpus_hash` next to what they train on.
- Task data (`make_task_data`): short, regular chat problems drawn from seeded
  templates (arithmetic, word manipulation, "what does os.path.join do?"),
  with SFT demonstrations (a share deliberately unhelpful), preference pairs
  and RL prompts. Held-out problems are chosen by a stable hash of the
  problem itself, so no validation problem is ever trained on by any stage.

Answers are checked by `lmforge.tasks`; the response templates here are
written so that `tasks.extract_answer` finds the answer in them.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

from lmforge.errors import LmforgeError
from lmforge.tasks import TASKS, first_sentence, normalize

# ---------------------------------------------------------------------------
# Defaults of `make_task_data`'s cfg (the `data.builtin` config section).
# A mapping given in cfg replaces the default mapping whole: names it leaves
# out weigh 0.
# ---------------------------------------------------------------------------

BUILTIN_DEFAULTS: dict[str, Any] = {
    # Records in the SFT training split.
    "n_sft": 6000,
    # Preference pairs in the preference training split.
    "n_pref": 3000,
    # Prompts in the RL training split.
    "n_rl": 2000,
    # Records in each held-out split (sft_val, pref_val, rl_val, rl_dev).
    "n_val": 200,
    # Share of every task's problem space reserved for the held-out splits.
    "heldout_fraction": 0.2,
    # Share of sum and difference answers written by column steps ("7 + 8 = 15, 4 + 3 + 1 = 8,
    # so 85.") instead of the bare equation ("47 + 38 = 85."), drawn per answer; true: all, false: none.
    "worked_steps": False,
    # Mixture weights of the tasks (normalized; 0 drops a task).
    "tasks": {"arithmetic": 0.5, "string": 0.35, "docstring": 0.15},
    # Share of SFT training demonstrations that are deliberately unhelpful,
    # by kind; the rest are helpful. sft_val is always all helpful.
    "noise": {"dismissive": 0.1, "wrong": 0.1, "rambling": 0.05},
    # Mixture weights of the kinds of rejected response in preference pairs.
    "rejected": {"dismissive": 1.0, "wrong": 1.0, "rambling": 1.0},
}

SPLITS = ("sft_train", "sft_val", "pref_train", "pref_val", "rl_train", "rl_val", "rl_dev")
UNHELPFUL_KINDS = ("dismissive", "wrong", "rambling")

# Docs shorter than this are mostly auto-generated stubs ("Alias for field number 0").
MIN_DOC_CHARS = 40
# Longest docstring sentence used as an answer: keeps answers within ~25 tokens.
MAX_FACT_CHARS = 100

# ---------------------------------------------------------------------------
# The standard library, read in a clean interpreter.
# ---------------------------------------------------------------------------


def _scan_stdlib(out_path: str) -> None:
    """Write the raw docstrings of the public stdlib to `out_path` as JSON.

    Output: {"docs": [raw docstring, ...], "functions": [[qualified name, raw
    docstring], ...]}, where "functions" holds each public module-level
    function once, under its canonical name ("os.path.join", "functools.reduce").

    This function runs in a fresh `python -I -S` (see `_stdlib_scan`), so it
    must stay self-contained: stdlib imports only, nothing from outside its
    body. A fresh interpreter sees the stdlib as shipped; in the caller's
    process, third-party packages may have patched it (transformers adds
    methods to logging.Logger, others replace inspect functions), which would
    make the corpus depend on what happened to be imported first.
    """
    import contextlib
    import importlib
    import io
    import json
    import os
    import pkgutil
    import re
    import sys
    import types
    import warnings

    # Never imported: side effects on import (antigravity opens a browser,
    # this prints), GUI toolkits and IDEs, test suites, packages that setuptools
    # shadows (distutils) or that write caches (lib2to3), installers, readline
    # (touches the terminal), platform-specific modules (so Linux and macOS
    # corpora stay close), and implementation modules whose content is reached
    # through a public one (genericpath through os.path, sre_* through re).
    skip_modules = {
        "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test",
        "lib2to3", "distutils", "readline", "rlcompleter", "ensurepip", "venv",
        "msilib", "msvcrt", "winreg", "winsound", "nt", "nturl2path",
        "posix", "pwd", "grp", "termios", "tty", "pty", "fcntl", "resource", "syslog",
        "crypt", "spwd", "nis", "ossaudiodev", "curses", "genericpath",
        "sre_compile", "sre_parse", "sre_constants", "xxsubtype", "xxlimited",
        "xxlimited_35", "pydoc_data", "encodings",
    }
    # Only the path module the platform uses: it is read as os.path.
    skip_modules |= {"posixpath", "ntpath"} - {os.path.__name__}
    # Submodules skipped by name: test suites and platform-specific variants
    # (asyncio.windows_events, multiprocessing.popen_fork, ctypes.macholib, ...).
    skip_submodule = re.compile(r"^(?:tests?|idle_test)$|win|unix|posix|fork|macholib|msvc")
    # Implementation modules whose functions are credited to the public module
    # exposing them (os.listdir is posix.listdir, os.path.exists genericpath's).
    implementation = {"posix", "nt", "genericpath"}
    routine_types = (types.FunctionType, types.BuiltinFunctionType, types.MethodDescriptorType,
                     types.ClassMethodDescriptorType, types.WrapperDescriptorType, property)
    stdlib_dir = os.path.dirname(os.__file__)

    def quiet_import(name):
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                return importlib.import_module(name)
        except (Exception, SystemExit):  # any failure means "not available here"
            return None

    def in_stdlib(module):
        path = getattr(module, "__file__", None)
        if path is None:  # built into the interpreter
            return True
        path = os.path.abspath(path)
        return path.startswith(stdlib_dir + os.sep) and "-packages" not in path

    modules = {}

    def visit(name):
        module = quiet_import(name)
        if module is None or not in_stdlib(module):
            return
        modules[name] = module
        for info in sorted(pkgutil.iter_modules(getattr(module, "__path__", [])), key=lambda i: i.name):
            if not info.name.startswith("_") and not skip_submodule.search(info.name):
                visit(f"{name}.{info.name}")

    for name in sorted(sys.stdlib_module_names):
        if not name.startswith("_") and name not in skip_modules:
            visit(name)

    def belongs(obj, module):
        # Defined in the module or in a private helper of it (_functools for
        # functools); names a module merely imports from a public one are not its own.
        origin = getattr(obj, "__module__", None)
        if not isinstance(origin, str):
            return False
        top = origin.split(".")[0]
        return origin == module.__name__ or (
            top in sys.stdlib_module_names and (top.startswith("_") or top in implementation))

    def public_members(module):
        names = getattr(module, "__all__", None)  # the module's own notion of public, if any
        if not isinstance(names, (list, tuple)):
            names = list(vars(module))
        for name in sorted({n for n in names if isinstance(n, str) and not n.startswith("_")}):
            obj = getattr(module, name, None)
            if obj is not None and not isinstance(obj, types.ModuleType) and belongs(obj, module):
                yield name, obj

    docs = []
    best = {}  # id(function) -> (rank, qualified name, doc)
    display = {os.path.__name__: "os.path"}
    for module_name, module in sorted(modules.items()):
        shown = display.get(module_name, module_name)
        docs.append(module.__doc__)
        for name, obj in public_members(module):
            docs.append(obj.__doc__)
            if isinstance(obj, type):
                for member_name, member in sorted(vars(obj).items()):
                    if isinstance(member, (staticmethod, classmethod)):
                        member = member.__func__
                    if not member_name.startswith("_") and isinstance(member, routine_types):
                        docs.append(member.__doc__)
            elif isinstance(obj, (types.FunctionType, types.BuiltinFunctionType)) and isinstance(obj.__doc__, str):
                # A function reachable from several modules gets one name: the
                # module matching its origin, else the shortest qualified name.
                qualified = f"{shown}.{name}"
                own = obj.__module__.lstrip("_") == module_name.lstrip("_")
                rank = (0 if own else 1, len(qualified), qualified)
                if id(obj) not in best or rank < best[id(obj)][0]:
                    best[id(obj)] = (rank, qualified, obj.__doc__)
    topics = quiet_import("pydoc_data.topics")
    if topics is not None:
        docs.extend(text for _, text in sorted(topics.topics.items()))
    result = {
        "docs": sorted({d for d in docs if isinstance(d, str)}),
        "functions": sorted([qualified, doc] for _, qualified, doc in best.values()),
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(result, f)


@functools.lru_cache(maxsize=1)
def _stdlib_scan() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(raw docstrings, (qualified name, raw docstring) of functions), from a clean interpreter."""
    if not sys.executable:
        raise LmforgeError("builtin:pretrain corpus: cannot find the Python interpreter (sys.executable is empty)")
    script = inspect.getsource(_scan_stdlib) + "\nimport sys\n_scan_stdlib(sys.argv[1])\n"
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "stdlib.json")
        # -I: ignore PYTHON* variables, user site and cwd; -S: no site-packages.
        try:
            proc = subprocess.run([sys.executable, "-I", "-S", "-c", script, out_path],
                                  capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise LmforgeError(f"builtin:pretrain corpus: cannot run {sys.executable}: {err}") from err
        if proc.returncode != 0 or not os.path.exists(out_path):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise LmforgeError(f"builtin:pretrain corpus: reading the standard library failed: {tail[0]}")
        with open(out_path, encoding="utf-8") as f:
            raw = json.load(f)
    return tuple(raw["docs"]), tuple((name, doc) for name, doc in raw["functions"])


def _clean(doc: str) -> str:
    """`inspect.cleandoc` plus trailing spaces removed from every line."""
    return "\n".join(line.rstrip() for line in inspect.cleandoc(doc).splitlines()).strip()


@functools.lru_cache(maxsize=1)
def _pretrain_documents() -> tuple[str, ...]:
    cleaned = {_clean(doc) for doc in _stdlib_scan()[0]}
    return tuple(sorted(doc for doc in cleaned if len(doc) >= MIN_DOC_CHARS))


def pretrain_documents() -> list[str]:
    """The built-in pretraining corpus: stdlib docstrings and pydoc help topics.

    Docstrings of public stdlib modules, classes, functions and methods, and
    the pydoc help topics, each cleaned by `inspect.cleandoc`; documents
    shorter than `MIN_DOC_CHARS` are dropped; sorted and free of duplicates.
    The content depends on the Python version and platform (record
    `corpus_hash`), never on what the calling process has imported.
    """
    return list(_pretrain_documents())


def corpus_hash(docs: list[str]) -> str:
    """sha256 hex digest of a list of documents, order- and boundary-sensitive.

    Each document is fed as its UTF-8 length (8 bytes, little-endian) then its
    bytes, so ["ab", "c"] and ["a", "bc"] hash differently.
    """
    digest = hashlib.sha256()
    for doc in docs:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


# Sentences ending in these are cut at an abbreviation, not at their real end.
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "approx.", "resp.")
# Characters that betray signatures, markup or code rather than prose.
_CODE_CHARS = re.compile(r"[()\[\]{}<>=`*|\\@#$%^~]|->|\.\.\.|::")


def _fact_sentence(doc: str) -> str | None:
    """The first sentence of a docstring when it is short, plain prose; else None."""
    cleaned = _clean(doc)
    if len(cleaned) < MIN_DOC_CHARS:  # facts must also be in the pretraining corpus
        return None
    sentence = first_sentence(cleaned.split("\n\n")[0])
    last_word = sentence.rsplit(" ", 1)[-1]
    # "Mr. A." or "version 3." end at an initial or a number, likely mid-sentence.
    cut_short = re.fullmatch(r"[A-Z]\.|\d+\.", last_word) is not None
    if not (15 <= len(sentence) <= MAX_FACT_CHARS and sentence.isascii() and sentence.endswith(".")):
        return None
    if not sentence[0].isupper() or cut_short or sentence.lower().endswith(_ABBREVIATIONS):
        return None
    if _CODE_CHARS.search(sentence) or " " not in sentence:
        return None
    return sentence


@functools.lru_cache(maxsize=1)
def _docstring_facts() -> tuple[tuple[str, str], ...]:
    facts = ((name, _fact_sentence(doc)) for name, doc in _stdlib_scan()[1])
    return tuple(sorted((name, sentence) for name, sentence in facts if sentence is not None))


def docstring_facts() -> list[tuple[str, str]]:
    """(qualified name, first docstring sentence) of public stdlib functions, sorted.

    Only functions whose first sentence is plain prose of at most
    `MAX_FACT_CHARS` characters ending in '.' are kept, e.g.
    ("os.path.join", "Join two or more pathname components, inserting '/' as needed.").
    Every fact's docstring is also a document of `pretrain_documents`.
    """
    return list(_docstring_facts())


# ---------------------------------------------------------------------------
# Problems: one prompt, its reference answer, the helpful response, and
# plausible wrong answers, per point of each task's problem space.
# ---------------------------------------------------------------------------

# Common lowercase English words of 3-7 letters for the string tasks.
WORDS: tuple[str, ...] = tuple(
    """
    able acid age air alarm album alive alley angle animal ankle apple april
    arena army arrow art aside attic aunt autumn awake baby back bacon badge
    bag baker ball bamboo banana band bank barn basket bath beach bean bear
    beard beast bed bee beef bell belt bench berry bike bird black blade
    blank blue board boat body bone book boot bottle bowl box brain branch
    bread brick bride bridge bright brown brush bucket cabin cable cake camel
    camera camp candle candy canoe cape car card carpet carrot castle cat
    cattle cave chair chalk cheese cherry chest chicken child chin circle
    city clay clock cloud coat coffee coin cold comb copper corn cotton
    cousin cow crab cream crown cup curtain dance desert desk diary dinner
    doctor dog doll dolphin door dragon drawer dream dress drum duck dust
    eagle earth egg elbow engine eye fabric face farm father feather fence
    field finger fire fish flag flame flower fog forest fork fox frog fruit
    garden gate ghost giant gift glass glove goat gold grape grass green
    guitar hammer hand harbor hat heart helmet hill honey horse hotel house
    ice island jacket jelly jewel juice kettle key king kitchen kite knee
    knife ladder lake lamp leaf lemon letter lily lion lizard lock magnet
    maple market melon metal milk mirror monkey moon mother mouse mouth music
    nail needle nest night noodle north nose ocean olive onion orange owl
    paint palace paper parrot peach pencil pepper piano pickle pigeon pillow
    pilot planet plate pocket potato pumpkin puzzle queen rabbit radio rain
    river road robot rocket roof rope rose salad salt sand school sea seed
    shadow sheep shell ship shirt shoe silver singer sister sky snake snow
    soap sock soup spider spoon spring star stone storm street sugar summer
    sun table tiger toast tomato tooth towel tower train tree truck tulip
    turtle uncle valley violin wagon wall water whale wheel window winter
    wizard wolf wood yellow zebra
    """.split()
)

_DISMISSIVE_RESPONSES = (
    "I don't know, look it up.",
    "I can't help with that.",
    "Figure it out yourself.",
    "No idea. Ask someone else.",
    "Why would I know that?",
    "That is not my problem.",
    "Look it up yourself.",
    "I'd rather not answer that.",
)
_FILLERS = (
    "Let me think about that.",
    "Hmm, that is a good question.",
    "Well, let me see.",
    "Okay, so, okay.",
    "That is an interesting one.",
)


@dataclass(frozen=True)
class Problem:
    """One point of a task's problem space.

    `key` identifies the problem independently of its wording and decides
    whether it is held out; `template` renders a response around an answer.
    """

    task: str
    key: str
    prompt: str
    answer: str
    template: str  # contains "{}" where the answer goes
    wrong_answers: tuple[str, ...]
    steps: str = ""  # the worked steps before the answer ("7 + 8 = 15, 4 + 3 + 1 = 8"), where the task has them

    def __post_init__(self) -> None:
        # A palindrome's reverse or an already sorted word makes some candidate
        # wrong answers right; those are dropped so "wrong" is always wrong.
        wrong = tuple(w for w in dict.fromkeys(self.wrong_answers) if w != self.answer)
        if not wrong:
            raise ValueError(f"problem {self.task}:{self.key} has no wrong answer")
        object.__setattr__(self, "wrong_answers", wrong)

    def respond(self, answer: str, worked: bool = False) -> str:
        """The response that gives `answer`, after the worked steps if `worked` and the problem has them."""
        return f"{self.steps}, so {answer}." if worked and self.steps else self.template.format(answer)


def _swap_adjacent(text: str, rng: random.Random) -> str:
    """`text` with one pair of adjacent, different characters swapped (text if none)."""
    spots = [i for i in range(len(text) - 1) if text[i] != text[i + 1]]
    if not spots:
        return text
    i = rng.choice(spots)
    return text[:i] + text[i + 1] + text[i] + text[i + 2 :]


def _column_steps(a: int, b: int, op: str) -> str:
    """The written column method for two numbers below 100, one digit step at a time.

    "47 + 38" -> "7 + 8 = 15, 4 + 3 + 1 = 8"; "45 - 37" -> "15 - 7 = 8, 4 - 3 - 1 = 0";
    a difference below zero is worked as the larger minus the smaller ("37 - 48" ->
    "48 - 37: 8 - 7 = 1, 4 - 3 - 0 = 1"). Every step is one single-digit fact and a
    carry or borrow, so a small model learns the method, not a table of 10,000 sums.
    """
    if op == "+":
        ones = a % 10 + b % 10
        return f"{a % 10} + {b % 10} = {ones}, {a // 10} + {b // 10} + {ones // 10} = {a // 10 + b // 10 + ones // 10}"
    prefix = ""
    if a < b:
        prefix, (a, b) = f"{b} - {a}: ", (b, a)
    borrow = int(a % 10 < b % 10)
    ones = f"{a % 10 + 10 * borrow} - {b % 10} = {a % 10 + 10 * borrow - b % 10}"
    return f"{prefix}{ones}, {a // 10} - {b // 10} - {borrow} = {a // 10 - b // 10 - borrow}"


def _arithmetic_problems() -> list[Problem]:
    """Addition and subtraction of 0-99 (with their column steps), multiplication of single digits."""
    problems = []
    spaces = (("+", range(100), lambda a, b: a + b), ("-", range(100), lambda a, b: a - b),
              ("*", range(10), lambda a, b: a * b))
    for op, operands, fn in spaces:
        for a in operands:
            for b in operands:
                result = fn(a, b)
                wrong = tuple(str(result + d) for d in (-10, -2, -1, 1, 2, 10))
                problems.append(Problem("arithmetic", f"{a}{op}{b}", f"What is {a} {op} {b}?", str(result),
                                        f"{a} {op} {b} = {{}}.", wrong, _column_steps(a, b, op) if op != "*" else ""))
    return problems


def _string_problems() -> list[Problem]:
    """Reverse, upper-case, count the letters of, and sort the letters of each word."""
    problems = []
    for word in WORDS:
        # Wrong answers are deterministic per word: the word-seeded generator
        # keeps the problem space independent of the data seed.
        rng = random.Random(word)
        reverse, upper, ordered = word[::-1], word.upper(), "".join(sorted(word))
        problems += [
            Problem("string", f"reverse:{word}", f"Reverse the word '{word}'.", reverse,
                    f"The reverse of '{word}' is '{{}}'.", (_swap_adjacent(reverse, rng), word)),
            Problem("string", f"upper:{word}", f"Write '{word}' in capital letters.", upper,
                    f"'{word}' in capital letters is '{{}}'.", (word, _swap_adjacent(upper, rng))),
            Problem("string", f"count:{word}", f"How many letters are in '{word}'?", str(len(word)),
                    f"'{word}' has {{}} letters.", tuple(str(len(word) + d) for d in (-1, 1, 2))),
            Problem("string", f"sort:{word}", f"Sort the letters of '{word}' alphabetically.", ordered,
                    f"The letters of '{word}' in order are '{{}}'.", (_swap_adjacent(ordered, rng), word)),
        ]
    return problems


def _docstring_problems() -> list[Problem]:
    """"What does os.path.join do?" for every docstring fact; wrong answers are neighbours' sentences."""
    facts = docstring_facts()
    problems = []
    for i, (name, sentence) in enumerate(facts):
        # Sorted neighbours are usually from the same module: plausible mistakes.
        nearest = (j for d in range(1, len(facts)) for j in (i - d, i + d) if 0 <= j < len(facts))
        wrong: list[str] = []
        for j in nearest:
            other = facts[j][1]
            if normalize(other) != normalize(sentence) and other not in wrong:
                wrong.append(other)
            if len(wrong) == 3:
                break
        problems.append(Problem("docstring", name, f"What does {name} do?", sentence, "{}", tuple(wrong)))
    return problems


# Each task's problem space, given the resolved data.builtin options.
_PROBLEM_SPACES: dict[str, Callable[[dict], list[Problem]]] = {
    "arithmetic": lambda opts: _arithmetic_problems(),
    "string": lambda opts: _string_problems(),
    "docstring": lambda opts: _docstring_problems(),
}


def is_heldout(problem: Problem, fraction: float) -> bool:
    """Whether a problem belongs to the held-out share of its task's problem space.

    Decided by a sha256 of the task and key alone, so membership is the same
    for every seed, stage and split size.
    """
    digest = hashlib.sha256(f"{problem.task}:{problem.key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


# ---------------------------------------------------------------------------
# Responses and records.
# ---------------------------------------------------------------------------


def _worked(problem: Problem, share: float, rng: random.Random) -> bool:
    """Whether a response to `problem` shows its worked steps: with probability `share`.

    No number is drawn for a share of 0 or 1 or a problem without steps, so
    those data are the same as if the option did not exist."""
    if not problem.steps or share <= 0:
        return False
    return share >= 1 or rng.random() < share


def _response(problem: Problem, kind: str, rng: random.Random, worked: bool = False) -> str:
    """A response of the given kind: helpful, dismissive, wrong or rambling (worked: with the steps)."""
    if kind == "helpful":
        return problem.respond(problem.answer, worked)
    if kind == "dismissive":
        return rng.choice(_DISMISSIVE_RESPONSES)
    if kind == "wrong":
        return problem.respond(rng.choice(problem.wrong_answers), worked)
    if kind == "rambling":
        helpful = problem.respond(problem.answer, worked)
        if rng.random() < 0.5:  # the answer buried after repeated filler
            return " ".join([rng.choice(_FILLERS)] * rng.randint(3, 4) + [helpful])
        return " ".join([helpful] * rng.randint(3, 4))  # the same sentence over and over
    raise ValueError(f"unknown response kind {kind!r}")


def _exact_counts(weights: dict[str, float], total: int) -> dict[str, int]:
    """Split `total` by `weights` into integers (largest remainder), summing to `total`."""
    weights = {k: w for k, w in weights.items() if w > 0}
    weight_sum = sum(weights.values())
    shares = {k: total * w / weight_sum for k, w in weights.items()}
    counts = {k: int(s) for k, s in shares.items()}  # floors; remainders added below
    by_remainder = sorted(weights, key=lambda k: (-(shares[k] - counts[k]), k))
    for k in by_remainder[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def _shuffled_labels(weights: dict[str, float], total: int, rng: random.Random) -> list[str]:
    """`total` labels in exact proportion to `weights`, in random order."""
    labels = [k for k, n in sorted(_exact_counts(weights, total).items()) for _ in range(n)]
    rng.shuffle(labels)
    return labels


def _draw(pool: list[Problem], k: int, rng: random.Random) -> list[Problem]:
    """k problems from pool: each used once before any is used twice."""
    drawn: list[Problem] = []
    while len(drawn) < k:
        drawn += rng.sample(pool, min(len(pool), k - len(drawn)))
    return drawn


def _sft_record(problem: Problem, kind: str, rng: random.Random, share: float) -> dict:
    worked = _worked(problem, share, rng)
    return {
        "messages": [{"role": "user", "content": problem.prompt},
                     {"role": "assistant", "content": _response(problem, kind, rng, worked)}],
        "task": problem.task,
        "answer": problem.answer,
        "kind": kind,
    }


def _pref_record(problem: Problem, kind: str, rng: random.Random, share: float) -> dict:
    # One style for both answers: the pair is about helpfulness, not about showing steps.
    worked = _worked(problem, share, rng)
    return {
        "prompt": problem.prompt,
        "chosen": _response(problem, "helpful", rng, worked),
        "rejected": _response(problem, kind, rng, worked),
        "task": problem.task,
        "answer": problem.answer,
        "rejected_kind": kind,
    }


def _rl_record(problem: Problem, kind: str, rng: random.Random, share: float) -> dict:
    return {"prompt": problem.prompt, "answer": problem.answer, "task": problem.task}


# ---------------------------------------------------------------------------
# Config checking.
# ---------------------------------------------------------------------------


def _resolve(cfg: dict | None) -> dict[str, Any]:
    """Defaults overlaid with cfg, checked; errors name the offending key."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(BUILTIN_DEFAULTS))
    if unknown:
        raise LmforgeError(f"data.builtin: unknown key {unknown[0]!r}; expected one of {', '.join(BUILTIN_DEFAULTS)}")
    out = {**BUILTIN_DEFAULTS, **cfg}
    for key in ("n_sft", "n_pref", "n_rl", "n_val"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 0:
            raise LmforgeError(f"data.builtin.{key}: expected a non-negative integer, got {out[key]!r}")
    fraction = out["heldout_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise LmforgeError(f"data.builtin.heldout_fraction: expected a number strictly between 0 and 1, got {fraction!r}")
    out["tasks"] = _weights(out["tasks"], "tasks", TASKS)
    out["rejected"] = _weights(out["rejected"], "rejected", UNHELPFUL_KINDS)
    out["noise"] = _weights(out["noise"], "noise", UNHELPFUL_KINDS, may_be_zero=True)
    steps = out["worked_steps"]
    if not isinstance(steps, (bool, int, float)) or not 0 <= steps <= 1:
        raise LmforgeError(f"data.builtin.worked_steps: expected true, false or a share between 0 and 1, got {steps!r}")
    out["worked_steps"] = float(steps)
    if sum(out["noise"].values()) > 1:
        raise LmforgeError(f"data.builtin.noise: shares sum to {sum(out['noise'].values()):.4g}, more than 1")
    return out


def _weights(value: Any, key: str, allowed: tuple[str, ...], may_be_zero: bool = False) -> dict[str, float]:
    if not isinstance(value, dict):
        raise LmforgeError(f"data.builtin.{key}: expected a mapping of {', '.join(allowed)} to numbers")
    for name, weight in value.items():
        if name not in allowed:
            raise LmforgeError(f"data.builtin.{key}.{name}: unknown; expected one of {', '.join(allowed)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise LmforgeError(f"data.builtin.{key}.{name}: expected a non-negative number, got {weight!r}")
    weights = {name: float(value.get(name, 0.0)) for name in allowed}
    if not may_be_zero and sum(weights.values()) <= 0:
        raise LmforgeError(f"data.builtin.{key}: at least one weight must be positive")
    return weights


# ---------------------------------------------------------------------------
# The entry point.
# ---------------------------------------------------------------------------


def make_task_data(cfg: dict | None, seed: int) -> dict[str, list[dict]]:
    """SFT, preference and RL records, train and held-out, for the built-in tasks.

    Args:
        cfg: overrides of `BUILTIN_DEFAULTS` (all keys optional).
        seed: the run seed; the same (cfg, seed) gives identical records.

    Returns:
        {"sft_train", "sft_val", "pref_train", "pref_val", "rl_train", "rl_val", "rl_dev"}
        -> list of records:
        - SFT: {"messages": [user, assistant], "task", "answer", "kind"}, kind
          one of helpful/dismissive/wrong/rambling (sft_val: helpful only).
        - preference: {"prompt", "chosen", "rejected", "task", "answer", "rejected_kind"}.
        - RL: {"prompt", "answer", "task"}.
        Train and held-out splits never share a problem (see `is_heldout`).
        rl_dev (RL stages pick their checkpoint on it) shares no problem with
        rl_val (what they and the evaluate stage report) while the held-out
        pool has problems left, so selection never sees the reported prompts.
    """
    opts = _resolve(cfg)
    tasks = {t: w for t, w in opts["tasks"].items() if w > 0}
    pools: dict[tuple[str, bool], list[Problem]] = {}
    for task in tasks:
        problems = _PROBLEM_SPACES[task](opts)
        if not problems:  # e.g. a Python build whose stdlib has no usable docstrings
            raise LmforgeError(f"data.builtin.tasks.{task}: no problems can be made for this task here; set it to 0")
        for heldout in (False, True):
            pool = [p for p in problems if is_heldout(p, opts["heldout_fraction"]) == heldout]
            if not pool:
                which = "held-out" if heldout else "training"
                raise LmforgeError(f"data.builtin.heldout_fraction: leaves no {which} problems for task {task!r}")
            pools[task, heldout] = pool

    helpful_share = max(0.0, 1.0 - sum(opts["noise"].values()))
    plans = {  # split -> (size, held out?, record maker, kind weights)
        "sft_train": (opts["n_sft"], False, _sft_record, {"helpful": helpful_share, **opts["noise"]}),
        "sft_val": (opts["n_val"], True, _sft_record, {"helpful": 1.0}),
        "pref_train": (opts["n_pref"], False, _pref_record, opts["rejected"]),
        "pref_val": (opts["n_val"], True, _pref_record, opts["rejected"]),
        "rl_train": (opts["n_rl"], False, _rl_record, {"helpful": 1.0}),
        "rl_val": (opts["n_val"], True, _rl_record, {"helpful": 1.0}),
        "rl_dev": (opts["n_val"], True, _rl_record, {"helpful": 1.0}),
    }
    data, drawn = {}, {}
    for split, (size, heldout, make, kinds) in plans.items():
        # One generator per split: changing n_pref leaves sft data untouched.
        rng = random.Random(f"lmforge-builtin:{seed}:{split}")
        task_labels = _shuffled_labels(tasks, size, rng)
        drawn[split] = {t: _draw(_dev_pool(pools[t, heldout], drawn.get("rl_val", {}).get(t, []))
                                 if split == "rl_dev" else pools[t, heldout], task_labels.count(t), rng)
                        for t in sorted(tasks)}
        problems_by_task = {t: iter(problems) for t, problems in drawn[split].items()}
        kind_labels = _shuffled_labels(kinds, size, rng)
        data[split] = [make(next(problems_by_task[t]), kind, rng, opts["worked_steps"])
                       for t, kind in zip(task_labels, kind_labels)]
    return data


def _dev_pool(pool: list[Problem], reported: list[Problem]) -> list[Problem]:
    """The held-out problems rl_val does not use; all of them once rl_val has used up the pool."""
    used = {p.key for p in reported}
    rest = [p for p in pool if p.key not in used]
    return rest or pool
