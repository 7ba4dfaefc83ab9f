"""The study on disk or in a shared database, and the trial budget its workers share.

Optuna's RDB storage holds the study: a SQLite file for one machine, PostgreSQL for many workers.
`--trials N` is the study's budget, not each worker's: a worker claims a trial only while the study
holds fewer than N that count, under a lock every worker of that storage takes (a PostgreSQL advisory
lock, or a file lock beside the SQLite file), so N workers never run N+1 trials between them.
A trial counts once it is running, finished, pruned, or failed by its own error (an enqueued one once
claimed); one stopped by
Ctrl-C/SIGTERM, or left running by a worker that died, does not, so the same command resumes it.
"""
from __future__ import annotations

import fcntl
import hashlib
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from exporters.errors import StorageError
from exporters.prediction_log.sql import redact, sqlalchemy_url
from training.errors import TrainingError

INTERRUPTED = "interrupted"
ERROR = "error"
ALIVE_AT = "alive_at"


def storage_url(given: str | None, out: Path) -> str:
    """The SQLAlchemy URL Optuna opens: `given` (psycopg 3 drives postgresql://), else SQLite in `out`."""
    if not given:
        return f"sqlite:///{(Path(out) / 'study.db').resolve()}"
    url = sqlalchemy_url(given)
    if url is not None:
        return url
    raise TrainingError(f"--storage {redact(given)!r} is not a storage cnnloop tune can share: give "
                        "sqlite:///path/study.db (one machine) or postgresql://user:password@host:5432/db (many workers)")


def open_study(url: str, name: str, sampler, pruner):
    import optuna
    import sqlalchemy.exc

    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        # Workers starting together on an empty database would race to create Optuna's tables
        # (a UniqueViolation in PostgreSQL's catalog): one at a time, under the study's lock.
        with budget_lock(url, name):
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
            return optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                       direction="maximize", load_if_exists=True)
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as e:
        raise StorageError(f"cannot open the study storage {redact(url)}: {str(e).splitlines()[0]}") from None


@contextmanager
def budget_lock(url: str, study_name: str) -> Iterator[None]:
    """One worker at a time counts the study's trials and claims the next one."""
    if url.startswith("sqlite:///"):
        with open(url[len("sqlite:///"):] + ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    import sqlalchemy

    key = int.from_bytes(hashlib.sha256(f"cnnloop-tune:{study_name}".encode()).digest()[:8], "big", signed=True)
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()


def counts_against_budget(trial) -> bool:
    from optuna.trial import TrialState

    if trial.state == TrialState.WAITING:
        return False  # enqueued, not yet claimed: it runs within the budget, not on top of it
    if trial.state == TrialState.FAIL:
        return ERROR in trial.user_attrs
    return True


def fail_stale(study, stale_after_s: float) -> list[int]:
    """Mark FAILED the running trials whose worker has not reported for `stale_after_s` (it died)."""
    from optuna.trial import TrialState

    now, stale = time.time(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        seen = t.user_attrs.get(ALIVE_AT, t.datetime_start.timestamp() if t.datetime_start else now)
        if now - seen > stale_after_s:
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            stale.append(t.number)
    return stale


def claim_trial(study, url: str, budget: int, stale_after_s: float, first_params: dict | None):
    """The next trial of the study, or None once `budget` trials count. `first_params` (the base
    recipe) is enqueued when the study is empty, so the search starts from the recipe it must beat."""
    with budget_lock(url, study.study_name):
        fail_stale(study, stale_after_s)
        trials = study.get_trials(deepcopy=False)
        if sum(counts_against_budget(t) for t in trials) >= budget:
            return None
        if first_params and not any("enqueued" in t.user_attrs and (counts_against_budget(t) or t.state.name == "WAITING")
                                    for t in trials):
            study.enqueue_trial(first_params, user_attrs={"enqueued": "base recipe"})
        trial = study.ask()
        trial.set_user_attr(ALIVE_AT, time.time())
        return trial
