"""MLflow tracking: one run per stage execution. The only module that imports mlflow.

MLflow is a witness, never a dependency of correctness: every call is guarded,
and a failing or unreachable store produces one warning and the stage goes on.
The files under results/ are the truth.

Store: ``$MLFLOW_TRACKING_URI`` if set, else ``tracking.uri`` from the config,
else ``sqlite:///<abs>/results/mlflow.db``.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

from lmforge.files import file_sha256

MAX_PARAM_LEN = 6000
# MLflow's HTTP client retries a dead server for minutes by default (7 retries, backoff 2);
# a stage should warn and go on within seconds. A user's own settings win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def tracking_uri(configured: str | None = None, results_dir: str | Path = "results") -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if configured:
        return configured
    return f"sqlite:///{Path(results_dir).resolve() / 'mlflow.db'}"


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Raise OSError unless the MLflow server at an http(s) uri answers its health check."""
    import urllib.request

    with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
        if r.status != 200:
            raise OSError(f"{uri}/health answered {r.status}")


@contextlib.contextmanager
def store_lock(uri: str):
    """Serialize stages that open the same sqlite store: two creating its schema at once fail."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store live beside its database file, not in ``./mlruns`` of whatever the cwd is."""
    if not uri.startswith("sqlite:///"):
        return None  # a server or other store picks its own artifact root
    db = Path(uri[len("sqlite:///"):])
    return (db.resolve().parent / "mlartifacts").as_uri()


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:MAX_PARAM_LEN]
    return out


def git_state(cwd: str | Path = ".") -> dict[str, str]:
    def git(*args):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"git.commit": head.stdout.strip(), "git.dirty": str(dirty).lower()}
    except (OSError, subprocess.SubprocessError):
        return {}


def read_run_id(path: str | Path) -> str | None:
    """The MLflow run id recorded beside (or inside) an artifact, if any."""
    import json

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    for name in ("metrics.json", "stats.json", "meta.json", "summary.json"):
        f = folder / name
        if f.exists():
            try:
                rid = json.loads(f.read_text()).get("mlflow_run_id")
            except (ValueError, AttributeError):
                continue
            if rid:
                return rid
    return None


class StageRun:
    """Context manager around one MLflow run.

    >>> with StageRun("pretrain", params=..., inputs={"train": "results/data/pretrain/train.bin"}) as run:
    ...     run.log_metrics({"loss": 3.2}, step=10)
    """

    def __init__(self, stage: str, *, params: Mapping[str, Any] | None = None, experiment: str = "lmforge",
                 uri: str | None = None, enabled: bool = True, tags: Mapping[str, str] | None = None,
                 inputs: Mapping[str, str | Path] | None = None, flush_every: int = 200):
        self.stage, self.experiment = stage, experiment
        self.uri = tracking_uri(uri)
        self.enabled = enabled
        self.params = flatten(params or {})
        self.tags = {"lmforge.stage": stage, "host": socket.gethostname(), **git_state(), **(tags or {})}
        self.inputs = {k: Path(v) for k, v in (inputs or {}).items()}
        self.lineage: dict[str, dict] = {}
        self.client = None
        self.run_id: str | None = None
        self._buffer: list = []
        self._flush_every = flush_every

    # ---- guarded calls ------------------------------------------------------------
    def _safe(self, what: str, fn, *args, **kw):
        if not self.enabled:
            return None
        try:
            return fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 — any tracking failure is non-fatal by design
            self.enabled = False
            warnings.warn(f"MLflow tracking disabled for stage '{self.stage}' ({what} failed: "
                          f"{e.__class__.__name__}: {str(e)[:300]}); training goes on, results/ holds the truth",
                          RuntimeWarning, stacklevel=3)
            print(f"WARNING: MLflow {what} failed ({e.__class__.__name__}); tracking disabled, stage continues",
                  file=sys.stderr)
            return None

    def __enter__(self) -> "StageRun":
        self.lineage = {name: {"path": str(p), "sha256": file_sha256(p) if p.exists() else None,
                               "run_id": read_run_id(p)} for name, p in self.inputs.items()}
        self._safe("start", self._start)
        return self

    def _start(self) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if self.uri.startswith(("http://", "https://")):
            for k, v in HTTP_DEFAULTS.items():
                os.environ.setdefault(k, v)
            check_server(self.uri)
        with store_lock(self.uri):  # the first touch of a new sqlite file creates its tables
            self.client = MlflowClient(tracking_uri=self.uri)
            exp_id = self._experiment_id()
        tags = dict(self.tags)
        for name, info in self.lineage.items():
            tags[f"lineage.{name}.sha256"] = str(info["sha256"])
            if info["run_id"]:
                tags[f"lineage.{name}.run_id"] = info["run_id"]
        parents = sorted({i["run_id"] for i in self.lineage.values() if i["run_id"]})
        if parents:
            tags["lineage.parents"] = ",".join(parents)
        run = self.client.create_run(exp_id, run_name=self.stage, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, v) for k, v in self.params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        self.client.log_dict(self.run_id, self.lineage, "lineage.json")
        self.client.set_tag(self.run_id, "lmforge.status", "running")

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp:
            return exp.experiment_id
        try:
            return self.client.create_experiment(self.experiment, artifact_location=artifact_location(self.uri))
        except Exception:  # noqa: BLE001 — a stage running beside this one created it first
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        as_text = {k: str(v) for k, v in tags.items()}
        self.tags.update(as_text)
        if self.run_id:
            self._safe("set_tags", lambda: [self.client.set_tag(self.run_id, k, v) for k, v in as_text.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.run_id:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, step)
                         for k, v in metrics.items() if v is not None]
        if len(self._buffer) >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        if self.run_id and self._buffer:
            buf, self._buffer = self._buffer, []
            self._safe("log_metrics", lambda: [self.client.log_batch(self.run_id, metrics=buf[i:i + 1000])
                                               for i in range(0, len(buf), 1000)])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if self.run_id and path.exists():
            self._safe("log_artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        if self.run_id:
            self._safe("log_dict", self.client.log_dict, self.run_id, obj, name)

    def log_text(self, text: str, name: str) -> None:
        if self.run_id:
            self._safe("log_text", self.client.log_text, self.run_id, text, name)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.flush()
        if self.run_id:
            status = "FINISHED" if exc_type is None else "FAILED"
            if exc is not None:
                self._safe("set_tag", self.client.set_tag, self.run_id, "lmforge.error", str(exc)[:5000])
            self._safe("set_tag", self.client.set_tag, self.run_id, "lmforge.status", status.lower())
            self._safe("end", self.client.set_terminated, self.run_id, status)
