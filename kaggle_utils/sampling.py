"""The sampling loop: every row of a test CSV through an engine, post-processed, stored as it goes, within the time
budget.

:func:`sample_rows` takes raw completions batch by batch from an engine (:mod:`kaggle_utils.engines`), extracts each
recovered prompt (:func:`postprocess`), appends the batch to the model's prediction file (:class:`PredictionStore`,
resumable after a kill -9) and watches the clock (:mod:`kaggle_utils.budget`), lowering n or stopping in time. The
prediction files are read back here too, by later stages (:func:`read_predictions`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import prompts
from .config import resolve_path
from .engines import Engine, SamplingConfig

logger = logging.getLogger("kaggle_utils")

# ---------------------------------------------------------------- post-processing


def postprocess(completions: Sequence[str], marker: str = "", fallback: str = "") -> tuple[list[str], int]:
    """The prompt sentence of each raw completion (:func:`prompts.extract_prompt`), with empties replaced by
    ``fallback``; returns (predictions, number of empties replaced)."""
    out, empty = [], 0
    for text in completions:
        p = prompts.extract_prompt(text, marker)
        if not p:
            empty += 1
            p = fallback
        out.append(p)
    return out, empty


def text_key(original_text: str, rewritten_text: str) -> str:
    """A short hash of a row's texts: a resumed run reuses a prediction only for the same id *and* the same texts."""
    return hashlib.sha1(f"{original_text}\x00{rewritten_text}".encode("utf-8", "replace")).hexdigest()[:16]


# ---------------------------------------------------------------- prediction files


class PredictionFileError(ValueError):
    """A prediction file with a line that is not a prediction row; the message names the file and the line."""



class PredictionStore:
    """``<run_dir>/predictions/<model>.jsonl``: one JSON line per done row, appended batch by batch with flush +
    fsync, so a kill -9 loses at most the batch being written.

    Opening the store drops a torn last line (a kill mid-write) and reads the done rows. A ``<model>.meta.json``
    beside it holds the model and sampling fingerprint: when it changed (another adapter, temperature, ...) the old
    file is kept as ``*.stale.jsonl`` and sampling starts afresh, so stale predictions are never mixed in.
    """

    def __init__(self, folder: str | os.PathLike, name: str, fingerprint: dict):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"{name}.jsonl"
        self.meta_path = self.folder / f"{name}.meta.json"
        self.fingerprint = fingerprint
        self._check_fingerprint()
        self.done: dict[str, dict] = self._load()

    def _check_fingerprint(self) -> None:
        if self.meta_path.exists() and self.path.exists():
            old = json.loads(self.meta_path.read_text())
            if old != self.fingerprint:
                changed = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
                stale = self.path.with_name(f"{self.path.stem}.{time.strftime('%Y%m%d-%H%M%S')}.stale.jsonl")
                self.path.rename(stale)
                logger.warning("%s: model or sampling changed (%s); old predictions moved to %s, sampling afresh",
                               self.path.name, ", ".join(changed), stale.name)
        self.meta_path.write_text(json.dumps(self.fingerprint, indent=2, sort_keys=True) + "\n")

    def _load(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        cut = data.rfind(b"\n") + 1
        if cut < len(data):  # a torn last line: the process died mid-write; its rows are redone
            logger.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", self.path.name,
                           len(data) - cut)
            os.truncate(self.path, cut)
            data = data[:cut]
        done: dict[str, dict] = {}
        bad = 0
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                done[str(rec["id"])] = rec  # a later line for the same id wins; the table never holds duplicates
            except (ValueError, KeyError, TypeError):
                bad += 1
        if bad:
            logger.warning("%s: skipped %d unreadable line(s)", self.path.name, bad)
        if done:
            logger.info("%s: %d row(s) already done (resume)", self.path.name, len(done))
        return done

    def is_done(self, row_id: str, key: str) -> bool:
        """True when ``row_id`` was predicted from the same texts (``key``)."""
        rec = self.done.get(str(row_id))
        return rec is not None and rec.get("key") == key

    def append(self, records: list[dict]) -> None:
        """Append records (each with ``id``, ``key``, ``predictions``) in one write, then flush and fsync."""
        if not records:
            return
        blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        for r in records:
            self.done[str(r["id"])] = r

    def rewrite_in_order(self, ids: Sequence[str]) -> None:
        """Rewrite the file with one line per done row, ``ids``' rows first in that order (the submission's), then any
        other row it holds; written to a temporary file and renamed over, so a kill never leaves half a file."""
        order = [str(i) for i in ids if str(i) in self.done]
        seen = set(order)
        order += [i for i in self.done if i not in seen]
        tmp = self.path.with_name(self.path.name + ".partial")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(self.done[i], ensure_ascii=False) + "\n" for i in order))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def predictions(self, ids: Sequence[str], keys: Sequence[str]) -> dict[str, list[str]]:
        """Predictions of the given rows that are done (same id and texts)."""
        return {i: self.done[i]["predictions"] for i, k in zip(ids, keys) if self.is_done(i, k)}


def fingerprint_files(folder: str | os.PathLike) -> str:
    """A cheap fingerprint of a model or adapter folder: the adapter weights' hash, or names and sizes of a merged
    model's files (hashing gigabytes of weights would cost minutes)."""
    folder = resolve_path(folder)
    adapter = folder / "adapter_model.safetensors"
    if adapter.exists():
        return hashlib.sha256(adapter.read_bytes()).hexdigest()[:16]
    if not folder.is_dir():
        return ""
    parts = sorted(f"{p.name}:{p.stat().st_size}" for p in folder.iterdir() if p.is_file())
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def read_predictions(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{row id: [prediction, ...]}`` from one model's prediction file, for the stages after inference (the blend
    choice, the probes). Unlike :class:`PredictionStore` it never repairs the file: a line that is not a prediction
    row is a :class:`PredictionFileError` naming the file and the line."""
    out: dict[str, list[str]] = {}
    file = Path(path)
    for k, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            preds = row["predictions"]
            out[str(row["id"])] = [str(p) for p in (preds if isinstance(preds, list) else [preds])]
        except (ValueError, KeyError, TypeError) as e:
            raise PredictionFileError(f"{file}: line {k} is not a prediction row ({e})") from None
    return out


# ---------------------------------------------------------------- the sampling loop


@dataclass
class SamplingReport:
    """What one model's sampling did, for the log and the notebook."""

    model: str  # the plan's model name
    engine: str  # hf | vllm
    rows: int  # rows the model was asked to predict
    resumed: int  # rows already in the prediction file
    sampled: int  # rows sampled in this run
    undone: int  # rows left without a prediction (deadline)
    n_requested: int  # predictions per row asked for
    n_used: int  # predictions per row in the last batch (the budget may lower n)
    empty: int  # empty generations replaced by the fallback
    retried: int  # rows whose n generations were all empty, asked again greedily on a shorter prompt
    seconds: float  # wall time of sampling
    rows_per_s: float  # sampled rows per second
    merge_s: float = 0.0  # seconds merging the adapter into a copy of the base before start (vLLM)
    load_s: float = 0.0  # seconds starting the engine (model load, vLLM's start)
    merged: bool = False  # vLLM served a merged copy (use_merged, or the merge at start) rather than a LoRARequest


def _retry_empty_rows(engine: Engine, records: list[dict], empty: list[int], rows, originals, rewrittens,
                      cfg: SamplingConfig) -> int:
    """Ask again, greedily and on a prompt cut to half the length, for rows whose n generations were all empty.

    A row far over the context (a 40,000-word text cut to the prompt limit) can leave a model answering nothing at
    all, and the generic fallback prompt scores poorly; a shorter view of the same row usually gets a real answer.
    ``empty`` holds the batch positions of those rows (``postprocess`` found no prediction in any generation). Its
    answer fills every one of the row's n slots; a retry that is empty too keeps the fallback. Returns how many rows
    were asked again.
    """
    if not empty:
        return 0
    retry = dataclasses.replace(cfg, n=1, temperature=0.0, greedy_first=False,
                                max_prompt_tokens=max(64, cfg.max_prompt_tokens // 2))
    again = engine.generate([originals[rows[k]] for k in empty], [rewrittens[rows[k]] for k in empty], retry,
                            progress=False)
    for k, raw in zip(empty, again):
        answer = prompts.extract_prompt(raw[0] if raw else "", engine.marker)
        records[k]["raw"] = records[k]["raw"] + list(raw)
        if answer:
            records[k]["predictions"] = [answer] * cfg.n
        logger.warning("row %s: all %d generation(s) were empty; a greedy retry on a prompt cut to %d tokens gave %r",
                       records[k]["id"], cfg.n, retry.max_prompt_tokens, answer or "nothing (fallback kept)")
    return len(empty)


def sample_rows(engine: Engine, ids: Sequence[str], originals: Sequence[str], rewrittens: Sequence[str],
                cfg: SamplingConfig, store: PredictionStore, fallback: str, budget=None, model_name: str = "",
                progress: bool = True) -> SamplingReport:
    """Sample every row not yet in ``store``, appending each batch to it; returns what happened.

    With a ``budget`` (:class:`kaggle_utils.budget.ModelBudget`) the loop measures throughput on the first batches,
    lowers n when the requested n cannot finish in this model's share of the remaining time, and stops before a
    batch that would cross it. Rows left undone get the fallback later, in blending: the submission stays complete.
    """
    keys = [text_key(o, r) for o, r in zip(originals, rewrittens)]
    skip = {i for i, (rid, k) in enumerate(zip(ids, keys)) if store.is_done(rid, k)}
    report = SamplingReport(model=model_name, engine=engine.name, rows=len(ids), resumed=len(skip), sampled=0,
                            undone=0, n_requested=cfg.n, n_used=cfg.n, empty=0, retried=0, seconds=0.0,
                            rows_per_s=0.0)
    start = time.time()
    current = cfg
    while len(skip) < len(ids):
        batches = engine.generate_batches(originals, rewrittens, current, skip=frozenset(skip), progress=progress)
        restart = None
        t0 = time.time()
        for rows, texts in batches:
            seconds = time.time() - t0
            records, all_empty = [], []
            for k, (i, raw) in enumerate(zip(rows, texts)):
                preds, empty = postprocess(raw, engine.marker, fallback)
                report.empty += empty
                if empty == len(raw):
                    all_empty.append(k)
                records.append({"id": str(ids[i]), "key": keys[i], "predictions": preds, "raw": list(raw)})
            report.retried += _retry_empty_rows(engine, records, all_empty, rows, originals, rewrittens, current)
            store.append(records)
            skip.update(rows)
            report.sampled += len(rows)
            if budget is not None:
                budget.record(seconds, len(rows), current.n)
                rows_left = len(ids) - len(skip)
                if rows_left and budget.should_stop(current.n):
                    logger.warning("%s: stopping before the deadline with %d row(s) undone (they get the fallback)",
                                   model_name, rows_left)
                    batches.close()
                    report.undone = rows_left
                    break
                n_fit = budget.fit_n(rows_left, cfg.n) if rows_left else current.n
                if n_fit < current.n:
                    logger.warning("%s: lowering n from %d to %d so the remaining %d row(s) fit the time budget",
                                   model_name, current.n, n_fit, rows_left)
                    restart = dataclasses.replace(current, n=n_fit)
                    batches.close()
                    break
            t0 = time.time()
        if report.undone:
            break
        if restart is None:
            break
        current = restart
        report.n_used = current.n
    report.seconds = round(time.time() - start, 2)
    report.rows_per_s = round(report.sampled / report.seconds, 3) if report.seconds else 0.0
    if report.empty:
        logger.warning("%s: %d empty generation(s) replaced by the fallback prompt", model_name, report.empty)
    return report
