"""The review queue: unlabeled predictions handed to people, one lease at a time, on SQLite or PostgreSQL.

Items are predictions whose image is stored and that have no label, queued with an acquisition
score (exporters.prediction_log.acquisition). A reviewer *leases* a batch: each item is theirs until
the lease expires, then free again. Two reviewers on any replicas never hold the same item:
PostgreSQL takes the candidate rows FOR UPDATE SKIP LOCKED (a second replica skips rows the first
is leasing), SQLite serialises writers (BEGIN IMMEDIATE). An answer goes through the log's one
feedback path (`sql.apply_feedback`, source "review" and the reviewer recorded), in the same
transaction that checks the lease, so the drift report and the retrain job use it unchanged.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
from sqlalchemy import and_, case, func, or_, select, update

from exporters.calibration import Calibration, uniform_from_digest
from exporters.prediction_log import schema
from exporters.prediction_log.acquisition import acquisition_scores, spread_batch
from exporters.prediction_log.records import REVIEW, PredictionRecord, decode_embedding
from exporters.prediction_log.sql import SqlPredictionLog, _record_from_row, apply_feedback

# A lease call looks at this many times the batch it hands out, to spread the batch over embeddings.
SPREAD_POOL = 5
# Rounds a lease call tries to fill its batch when concurrent reviewers took some of its candidates.
_LEASE_ROUNDS = 20
_LOCKED_WAIT_S = 0.02
MAX_BATCH = 50
LABEL_CHECK = "label_check"
ABSTAINED = "abstained"
# Items sent back for a second look come before anything the acquisition scores rank.
SECOND_LOOK_PRIORITY = 1e9


class ReviewError(Exception):
    """An answer or lease the queue refuses; `kind` says which (the service maps it to a status)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # not_queued | lease_expired | foreign_lease | already_answered


@dataclass(frozen=True)
class ReviewItem:
    prediction: PredictionRecord
    lease_id: str
    lease_expires: float
    priority: float
    strategy: str
    reason: str | None


@dataclass(frozen=True)
class Answer:
    prediction_id: str
    outcome: str  # labeled | skipped
    label: str | None
    predicted_label: str
    previous_label: str | None
    changed: bool
    seconds_since_prediction: float


@dataclass(frozen=True)
class QueueState:
    waiting: int  # free to lease (never leased, or the lease expired)
    leased: int  # held by a reviewer now
    labeled: int
    skipped: int
    expired_leases: int  # leases that ran out before an answer (the item went back to the queue)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _new_lease_id() -> str:
    return secrets.token_hex(12)


class ReviewQueue:
    def __init__(self, log: SqlPredictionLog):
        self.log = log
        self.engine = log.engine

    # filling -------------------------------------------------------------------------------

    def candidates(self, model_version: str, limit: int) -> list[PredictionRecord]:
        """Newest unlabeled predictions of `model_version` with a stored image, not yet queued."""
        p, r = schema.predictions, schema.review_items
        query = (select(p).outerjoin(r, r.c.prediction_id == p.c.prediction_id)
                 .where(p.c.model_version == model_version, p.c.image_stored == 1, p.c.feedback_label.is_(None),
                        r.c.prediction_id.is_(None))
                 .order_by(p.c.model_version.desc(), p.c.created_at.desc(), p.c.prediction_id.desc()).limit(int(limit)))
        with self.engine.connect() as conn:
            return [_record_from_row(row) for row in conn.execute(query).all()]

    def enqueue(self, scored: list[tuple[str, float, str, str | None]]) -> int:
        """Queue (prediction_id, priority, strategy, reason) rows; an id already queued keeps its row."""
        if not scored:
            return 0
        now = time.time()
        rows = [{"prediction_id": pid, "queued_at": now, "priority": float(priority), "strategy": strategy, "reason": reason}
                for pid, priority, strategy, reason in scored]
        # Counted from RETURNING: psycopg reports rowcount -1 for a many-row insert, so PostgreSQL said 0.
        insert_new = self.log._insert_new(schema.review_items).returning(schema.review_items.c.prediction_id)
        with self.engine.begin() as conn:
            return len(conn.execute(insert_new, rows).all())

    def refill(self, model_version: str, strategy: str, calibration: Calibration | None = None,
               reference_embeddings: np.ndarray | None = None, pool: int = 2000) -> int:
        """Score the newest unqueued predictions of the served version and queue them; abstained ones
        (under the bundle's abstention rule) first. Returns how many were queued."""
        records = self.candidates(model_version, pool)
        if not records:
            return 0
        probs = probabilities_of(records)
        ids = [rec.prediction_id for rec in records]
        # The random draw is keyed on the image, not the prediction id (which encodes its time): the
        # same traffic is queued the same way on every run, and a repeated image draws once.
        scores = acquisition_scores(strategy, [rec.image_sha256 for rec in records], probs, embeddings_of(records),
                                    reference_embeddings)
        abstained = np.zeros(len(records), dtype=bool)
        if calibration is not None:
            u = np.array([uniform_from_digest(rec.image_sha256) for rec in records])
            abstained = calibration.abstain(probs, calibration.sets(probs, u))
        # Abstained answers first: a second band above every score of the strategy.
        priority = scores + np.where(abstained, 1e6, 0.0)
        return self.enqueue([(pid, float(pr), strategy, ABSTAINED if a else None)
                             for pid, pr, a in zip(ids, priority, abstained)])

    def send_back(self, prediction_ids: list[str], reason: str = LABEL_CHECK, strategy: str = LABEL_CHECK) -> int:
        """Put labeled predictions back in front of the queue for a second look (their label stays in the
        log until a reviewer changes it); predictions never queued are queued."""
        r = schema.review_items
        ids = list(dict.fromkeys(prediction_ids))
        if not ids:
            return 0
        with self.engine.connect().execution_options(writes=True) as conn, conn.begin():
            p = schema.predictions  # only predictions the log holds can be shown to a reviewer
            ids = [i for i in ids if i in set(conn.execute(select(p.c.prediction_id).where(p.c.prediction_id.in_(ids))).scalars())]
            known = set(conn.execute(select(r.c.prediction_id).where(r.c.prediction_id.in_(ids))).scalars())
            if known:
                conn.execute(update(r).where(r.c.prediction_id.in_(known)).values(
                    answered_at=None, outcome=None, lease_id=None, leased_to=None, lease_expires=None,
                    priority=SECOND_LOOK_PRIORITY, reason=reason))
            new = [{"prediction_id": pid, "queued_at": time.time(), "priority": SECOND_LOOK_PRIORITY, "strategy": strategy,
                    "reason": reason} for pid in ids if pid not in known]
            if new:
                conn.execute(self.log._insert_new(schema.review_items), new)
        return len(ids)

    def second_looks(self) -> set[str]:
        """Predictions a reviewer labeled after the label check sent them back: a person looked twice."""
        r = schema.review_items
        with self.engine.connect() as conn:
            return set(conn.execute(select(r.c.prediction_id).where(r.c.reason == LABEL_CHECK, r.c.outcome == "labeled")).scalars())

    # leasing -------------------------------------------------------------------------------

    def lease(self, reviewer: str, n: int, lease_seconds: float, spread: bool = True) -> tuple[list[ReviewItem], int]:
        """(up to n items leased to `reviewer`, how many of them had an earlier lease that expired).

        Each round locks a pool of free candidates FOR UPDATE SKIP LOCKED (PostgreSQL: a concurrent
        lease on another replica skips them; SQLite runs writers one at a time), spreads the batch
        over it and leases the batch. The rest of the pool is released at commit, milliseconds
        later; a round that found every free row locked by other leases waits for them and tries
        again, so concurrent reviewers share a small queue instead of one getting nothing."""
        r = schema.review_items
        n = max(1, min(int(n), MAX_BATCH))
        lease_id, leased, expired = _new_lease_id(), [], 0
        for _ in range(_LEASE_ROUNDS):
            now = time.time()
            expires = now + lease_seconds
            with self.engine.connect().execution_options(writes=True) as conn, conn.begin():
                query = self._free_query(now, n - len(leased), spread)
                if self.log.dialect == "postgresql":
                    query = query.with_for_update(skip_locked=True, of=r)
                rows = conn.execute(query).all()
                if rows:
                    records = [_prediction_of(row) for row in rows]
                    chosen = self._choose(rows, records, n - len(leased), spread)
                    conn.execute(update(r).where(r.c.prediction_id.in_([rows[i].prediction_id for i in chosen])).values(
                        lease_id=lease_id, leased_to=reviewer, lease_expires=expires, leases=r.c.leases + 1))
                    leased += [ReviewItem(records[i], lease_id, expires, rows[i].priority, rows[i].strategy, rows[i].reason)
                               for i in chosen]
                    expired += sum(rows[i].lease_id is not None for i in chosen)
            if len(leased) >= n or not self._any_free(time.time()):
                break
            if not rows:
                time.sleep(_LOCKED_WAIT_S)  # every free row is in another lease's pool for a moment
        return leased, expired

    def _any_free(self, now: float) -> bool:
        r = schema.review_items
        with self.engine.connect() as conn:
            return conn.execute(select(r.c.prediction_id).where(self._free(now)).limit(1)).first() is not None

    @staticmethod
    def _free(now: float):
        r = schema.review_items
        return and_(r.c.answered_at.is_(None), or_(r.c.lease_expires.is_(None), r.c.lease_expires < now))

    def _free_query(self, now: float, n: int, spread: bool):
        p, r = schema.predictions, schema.review_items
        # p's prediction_id only: a second column of that name would make `row.prediction_id` ambiguous.
        return (select(r.c.priority, r.c.strategy, r.c.reason, r.c.lease_id, p)
                .join(p, p.c.prediction_id == r.c.prediction_id).where(self._free(now))
                .order_by(r.c.priority.desc(), r.c.prediction_id).limit(n * SPREAD_POOL if spread else n))

    @staticmethod
    def _choose(rows, records: list[PredictionRecord], n: int, spread: bool) -> list[int]:
        if not spread or len(rows) <= n:
            return list(range(min(n, len(rows))))
        second_look = [i for i, row in enumerate(rows) if row.priority >= SECOND_LOOK_PRIORITY]
        if len(second_look) >= n:
            return second_look[:n]
        embeddings = [decode_embedding(rec.embedding) for rec in records]
        usable = all(e is not None for e in embeddings) and len({e.shape for e in embeddings}) == 1
        scores = np.array([row.priority for row in rows], dtype=np.float64)
        return spread_batch(scores, np.stack(embeddings) if usable else None, n)

    # answering -----------------------------------------------------------------------------

    def _held(self, conn, lease_id: str, prediction_id: str):
        r = schema.review_items
        row = conn.execute(select(r).where(r.c.prediction_id == prediction_id).with_for_update()).first()
        if row is None:
            raise ReviewError("not_queued", f"prediction {prediction_id} was never queued for review; take items "
                                            "from POST /review/next and answer those")
        if row.lease_id != lease_id:
            raise ReviewError("foreign_lease", f"prediction {prediction_id} is not held by lease {lease_id} (another "
                                               "reviewer holds it, or your lease expired and it was handed on); take new items")
        return row

    def answer(self, lease_id: str, prediction_id: str, label: str | None, reviewer: str | None = None) -> Answer:
        """Label (or skip, label None) one leased item; the label goes through the log's feedback path."""
        r = schema.review_items
        now = time.time()
        with self.engine.connect().execution_options(writes=True) as conn, conn.begin():
            row = self._held(conn, lease_id, prediction_id)
            if row.answered_at is not None:
                raise ReviewError("already_answered", f"prediction {prediction_id} was already answered under this lease "
                                                      f"({row.outcome}); undo it first to answer again")
            if row.lease_expires < now:
                raise ReviewError("lease_expired", f"the lease on prediction {prediction_id} expired "
                                                   f"{now - row.lease_expires:.0f} s ago; take new items (it went back to the queue)")
            p = schema.predictions
            predicted, created_at = conn.execute(select(p.c.label, p.c.created_at).where(p.c.prediction_id == prediction_id)).one()
            changed, previous = False, None
            if label is not None:
                given = apply_feedback(conn, prediction_id, label, REVIEW, reviewer or row.leased_to, now)
                changed, previous = given.changed, given.previous_label
            outcome = "skipped" if label is None else "labeled"
            conn.execute(update(r).where(r.c.prediction_id == prediction_id).values(answered_at=now, outcome=outcome, label=label))
        return Answer(prediction_id, outcome, label, predicted, previous, changed, now - created_at)

    def undo(self, lease_id: str, prediction_id: str, lease_seconds: float) -> ReviewItem:
        """Reopen an item this lease answered, so its reviewer can answer again (a new label is kept as a
        label change, the earlier one in feedback_events); the lease is renewed."""
        r = schema.review_items
        now = time.time()
        with self.engine.connect().execution_options(writes=True) as conn, conn.begin():
            row = self._held(conn, lease_id, prediction_id)
            if row.answered_at is None:
                raise ReviewError("not_answered", f"prediction {prediction_id} has no answer to undo")
            conn.execute(update(r).where(r.c.prediction_id == prediction_id).values(
                answered_at=None, outcome=None, lease_expires=now + lease_seconds))
            record = _record_from_row(conn.execute(select(schema.predictions)
                                                   .where(schema.predictions.c.prediction_id == prediction_id)).one())
        return ReviewItem(record, lease_id, now + lease_seconds, row.priority, row.strategy, row.reason)

    # reading -------------------------------------------------------------------------------

    def held_prediction(self, lease_id: str, prediction_id: str) -> PredictionRecord | None:
        """The prediction of an item `lease_id` holds (answered or not), else None."""
        p, r = schema.predictions, schema.review_items
        with self.engine.connect() as conn:
            row = conn.execute(select(p).join(r, r.c.prediction_id == p.c.prediction_id)
                               .where(r.c.prediction_id == prediction_id, r.c.lease_id == lease_id)).first()
        return None if row is None else _record_from_row(row)

    def state(self) -> QueueState:
        r = schema.review_items
        now = time.time()
        open_ = r.c.answered_at.is_(None)
        held = and_(open_, r.c.lease_expires >= now)

        def count(cond):
            return func.coalesce(func.sum(case((cond, 1), else_=0)), 0)

        with self.engine.connect() as conn:
            waiting, leased, labeled, skipped, expired = conn.execute(select(
                count(and_(open_, or_(r.c.lease_expires.is_(None), r.c.lease_expires < now))), count(held),
                count(r.c.outcome == "labeled"), count(r.c.outcome == "skipped"),
                count(and_(open_, r.c.lease_expires < now)))).one()
        return QueueState(int(waiting), int(leased), int(labeled), int(skipped), int(expired))


def _prediction_of(row) -> PredictionRecord:
    """The prediction in a row that also carries review_items columns (`_record_from_row` takes them all)."""
    return _record_from_row(SimpleNamespace(_mapping={c.name: row._mapping[c] for c in schema.predictions.columns}))


def probabilities_of(records: list[PredictionRecord]) -> np.ndarray:
    return np.array([rec.probabilities for rec in records], dtype=np.float64)


def embeddings_of(records: list[PredictionRecord]) -> np.ndarray | None:
    found = [decode_embedding(rec.embedding) for rec in records]
    if not found or any(e is None for e in found) or len({e.shape for e in found}) != 1:
        return None
    return np.stack(found)

