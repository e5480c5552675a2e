"""The HF engine data-parallel: one copy of the model per card, each card sampling its share of the rows in a
process of its own.

Where vLLM cannot start, a model too big for one card runs in the HF engine with its layers split over the cards, in
one process, where the cards take turns. The other way, on Kaggle's 2xT4 for Mistral-7B: one 4-bit (nf4) copy of the
base with the adapter on each card, all sampling at once. :func:`sample_on_cards` runs one model of the plan so:

1. rows done before (in the model's prediction file, or in part files an interrupted run left) are not sampled again
   (:func:`fold_parts`);
2. the other rows are dealt out longest first, in turn, so every card gets the same mix of lengths;
3. one worker per card (``python -m kaggle_utils.card_parallel <job.json>``, a fresh process with
   ``CUDA_VISIBLE_DEVICES`` set to its card before torch loads; on a CPU machine ``copies`` CPU processes) loads the
   engine through :func:`kaggle_utils.serving.serve` (4-bit where a GPU runs it) and samples its share with
   :func:`kaggle_utils.sampling.sample_rows` into a part file of its own, ``<model>.parts/part<k>.jsonl`` beside the
   model's prediction file (a :class:`kaggle_utils.sampling.PredictionStore`, appended batch by batch), its log
   ``part<k>.log`` beside it;
4. the parent waits, logging progress, and kills a worker that outlives the model's time share; then it writes
   every done row into the model's prediction file in the submission's row order and removes the parts. A worker
   that failed is then raised as a :class:`WorkerError` naming it, its card and its log; the rows it finished are in
   the file.

The parts sit in a folder of their own so that ``predictions/*.jsonl`` stays one file per model (the blend choice
reads that folder). ``InferenceConfig.hf_copies`` turns this on; not measured on two GPUs yet, and the engine rule
(:func:`kaggle_utils.serving.auto_choice`) does not choose it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from . import adapters, artifacts, budget, engines, models, sampling, serving
from .plan import ModelEntry

logger = logging.getLogger("kaggle_utils")

PARTS_SUFFIX = ".parts"  # <model>.parts/ beside <model>.jsonl
_PART = re.compile(r"^part(\d+)\.jsonl$")
KILL_GRACE_S = 120.0  # a worker still running this long after its time share ended is killed (it should have stopped)


class WorkerError(RuntimeError):
    """A worker process failed or was killed; the message names the worker, its card and its log. ``result`` is the
    model's :class:`CardsReport`: what the other workers (and this one, before it failed) sampled."""

    def __init__(self, message: str, result: "CardsReport"):
        super().__init__(message)
        self.result = result


@dataclass
class WorkerResult:
    """What one worker did: its rows, its exit, and the report it wrote (None when it died before writing one)."""

    worker: int  # 0 .. copies - 1
    card: str  # the CUDA device it saw ("cpu" on a CPU machine)
    ids: list  # the row ids it was given
    log: str  # its log file
    returncode: int | None = None  # the process's exit status (negative: killed by that signal)
    report: dict | None = None  # sampling.SamplingReport's fields + startup, peak_gib, pid, four_bit
    killed: str = ""  # why the parent killed it, if it did

    @property
    def failed(self) -> bool:
        return self.returncode != 0 or self.report is None or bool(self.report.get("error"))


@dataclass
class CardsReport:
    """One model sampled on several cards: the combined report (``sampling.csv``'s row) and each worker's."""

    report: sampling.SamplingReport
    workers: list = field(default_factory=list)  # WorkerResult per worker
    wall_s: float = 0.0  # from the first worker's start to the join, start-up included


# ---------------------------------------------------------------- the part files


def parts_folder(store: sampling.PredictionStore) -> Path:
    """Where the workers' part files of ``store``'s model go: ``<model>.parts/`` beside ``<model>.jsonl``."""
    return store.folder / f"{store.path.stem}{PARTS_SUFFIX}"


def _part_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _PART.match(p.name) and p.is_file()),
                  key=lambda p: int(_PART.match(p.name).group(1)))


def _remove_parts(folder: Path) -> None:
    """Delete the part files, their meta files, jobs and reports (the logs stay, for a look after the run)."""
    for p in folder.glob("part*"):
        if p.is_file() and not p.name.endswith(".log") and ".stale." not in p.name:
            p.unlink()


def _take(store: sampling.PredictionStore, records) -> int:
    """Append the records ``store`` does not hold yet (same id and texts); returns how many."""
    new = [r for r in records if isinstance(r, dict) and "id" in r and not store.is_done(r["id"], r.get("key", ""))]
    store.append(new)
    return len(new)


def _take_parts(store: sampling.PredictionStore) -> tuple[int, int]:
    """Append the rows of every part file that ``store`` does not hold yet, then delete the parts; returns the rows
    taken and the part files read. Each part is opened as a store of its own with ``store``'s fingerprint, so a torn
    last line (a worker killed mid-write) is dropped and a part of another model or setting is set aside as
    ``*.stale.jsonl``."""
    folder = parts_folder(store)
    files = _part_files(folder)
    moved = sum(_take(store, sampling.PredictionStore(folder, p.stem, store.fingerprint).done.values()) for p in files)
    if files:
        _remove_parts(folder)
    return moved, len(files)


def fold_parts(store: sampling.PredictionStore) -> int:
    """Move the rows of part files an interrupted parallel run left into ``store`` (appended; a row the store already
    has from the same texts is skipped), then delete the parts; returns how many rows came in."""
    moved, files = _take_parts(store)
    if files:
        logger.info("%s: %d row(s) taken from the parts of an interrupted parallel run", store.path.name, moved)
    return moved


def deal_rows(originals: Sequence[str], rewrittens: Sequence[str], todo: Sequence[int], copies: int) -> list[list[int]]:
    """The row indices ``todo`` dealt to ``copies`` workers, longest texts first, in turn: each gets the same mix of
    lengths, so the cards finish together (the engine sorts by length inside each share)."""
    ranked = sorted(todo, key=lambda i: -(len(originals[i]) + len(rewrittens[i])))
    return [sorted(ranked[k::copies]) for k in range(copies)]


# ---------------------------------------------------------------- the parent


def engine_for(entry: ModelEntry, requested: str = "auto") -> str:
    """The engine :func:`kaggle_utils.serving.serve` would start for ``entry`` (the same rule, on the same folder)."""
    return serving.pick_engine(requested, entry.preset, entry.merged_folder or entry.base_model)


def _visible_cards(gpus: int) -> list[str]:
    """The device each worker sees as its only card: the parent's ``CUDA_VISIBLE_DEVICES`` entries when set."""
    listed = [c.strip() for c in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if c.strip()]
    return listed[:gpus] if len(listed) >= gpus else [str(i) for i in range(gpus)]


def _worker_env(card: str, threads: int) -> dict:
    """The child's environment: this package first on its path (the same copy as the parent's), its card alone
    visible before torch loads, its share of the CPU threads."""
    env = dict(os.environ)
    package_root = str(Path(__file__).parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if card != "cpu":
        env["CUDA_VISIBLE_DEVICES"] = card
    return env


def _rows_in(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def sample_on_cards(entry: ModelEntry, scfg: engines.SamplingConfig, ids: Sequence[str], originals: Sequence[str],
                    rewrittens: Sequence[str], store: sampling.PredictionStore, fallback: str, copies: int,
                    share: budget.ModelBudget | None = None, options: engines.EngineOptions | None = None,
                    load_in_4bit: bool | None = None, model_name: str = "", poll_s: float = 0.5,
                    progress_every_s: float = 60.0) -> CardsReport:
    """Sample the rows of ``entry`` not yet in ``store`` with ``copies`` copies of the HF engine, one per card in a
    process of its own, then join their parts into ``store``'s file in ``ids``' order (see the module's steps).

    ``copies`` above the visible cards runs one per card (logged); on a CPU machine it is the number of CPU
    processes. ``share`` is the model's time share: each worker keeps to it, and one still running
    :data:`KILL_GRACE_S` after it ends is killed. ``load_in_4bit`` None: 4-bit where a GPU runs it. A wrong plan (a
    missing folder, an adapter of another model) is raised here before any worker starts; a failed worker is a
    :class:`WorkerError` raised after the join, so every row any worker finished is in the file.
    """
    name = model_name or entry.name
    base = models.resolve_base_path(models.get_preset(entry.preset), entry.merged_folder or entry.base_model)
    adapter = "" if entry.use_merged else adapters.selected_adapter(entry.adapter, entry.preset)
    if adapter:
        adapters.check_adapter_fits(adapter, base)
    fold_parts(store)
    keys = [sampling.text_key(o, r) for o, r in zip(originals, rewrittens)]
    todo = [i for i, (rid, k) in enumerate(zip(ids, keys)) if not store.is_done(rid, k)]
    resumed = len(ids) - len(todo)
    gpus = models.gpu_count()
    if gpus and copies > gpus:
        logger.warning("%s: hf_copies=%d but %d card(s) are visible: one copy per card, %d processes", name, copies,
                       gpus, gpus)
        copies = gpus
    copies = max(1, min(copies, len(todo)))
    cards = _visible_cards(gpus)[:copies] if gpus else ["cpu"] * copies
    four_bit = gpus > 0 if load_in_4bit is None else bool(load_in_4bit)
    threads = max(1, models.usable_cores() // copies)  # the CPUs this process may use, shared out
    folder = parts_folder(store)
    folder.mkdir(parents=True, exist_ok=True)
    shares = deal_rows(originals, rewrittens, todo, copies) if todo else []
    workers, procs = [], []
    start = time.time()
    try:
        for k, rows in enumerate(shares):
            job = {"worker": k, "card": cards[k], "entry": entry.to_dict(), "sampling": dataclasses.asdict(scfg),
                   "options": dataclasses.asdict(options or engines.EngineOptions()), "folder": str(folder),
                   "name": f"part{k}", "fingerprint": store.fingerprint, "fallback": fallback,
                   "ids": [str(ids[i]) for i in rows], "originals": [originals[i] for i in rows],
                   "rewrittens": [rewrittens[i] for i in rows], "ends_at": share.ends_at if share else None,
                   "load_in_4bit": four_bit, "threads": threads, "model_name": f"{name} [worker {k}]",
                   "report": str(folder / f"part{k}.report.json")}
            job_path = folder / f"part{k}.job.json"
            job_path.write_text(json.dumps(job))
            Path(job["report"]).unlink(missing_ok=True)
            log = folder / f"part{k}.log"
            with open(log, "w") as fh:  # the child holds its own handle; ours closes at once
                procs.append(subprocess.Popen([sys.executable, "-m", "kaggle_utils.card_parallel", str(job_path)],
                                              stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                              env=_worker_env(cards[k], threads)))
            workers.append(WorkerResult(worker=k, card=cards[k], ids=job["ids"], log=str(log)))
        if workers:
            logger.info("%s: %d row(s) on %d %s, one %s copy each, about %d rows each (%d done before); logs in %s",
                        name, len(todo), copies, "card(s)" if gpus else "CPU process(es)",
                        "4-bit" if four_bit else "16-bit", len(shares[0]), resumed, folder)
        _wait(workers, procs, share, name, folder, poll_s, progress_every_s)
    finally:
        for p in procs:  # an interrupt of the parent (or an error here) must not leave workers holding the cards
            if p.poll() is None:
                p.kill()
                p.wait()
    wall = time.time() - start
    for w in workers:
        report = Path(folder / f"part{w.worker}.report.json")
        w.report = json.loads(report.read_text()) if report.exists() else None
    _take_parts(store)  # every worker's rows, a failed one's included
    store.rewrite_in_order(ids)
    result = _combine(name, scfg, ids, keys, store, resumed, workers, wall)
    if workers:
        logger.info("%s: %d row(s) sampled on %d worker(s) in %.0f s, start-up included (%.2f rows/s over the slowest "
                    "card's %.0f s of sampling; start-up up to %.0f s), joined in row order into %s", name,
                    result.report.sampled, len(workers), wall, result.report.rows_per_s, result.report.seconds,
                    result.report.load_s, store.path.name)
    failed = [w for w in workers if w.failed]
    if failed:
        raise WorkerError("\n".join(_failure(name, w) for w in failed), result)
    return result


def _failure(name: str, w: WorkerResult) -> str:
    """What went wrong with one worker: which, on which card, why, and the end of its log."""
    where = "a CPU process" if w.card == "cpu" else f"card {w.card}"
    why = w.killed or (w.report or {}).get("error") or (
        f"was killed by signal {-w.returncode}" if w.returncode and w.returncode < 0
        else f"exited with status {w.returncode} before writing its report")
    return f"{name}: worker {w.worker} ({where}) {why}; its log: {w.log}, ending:\n{_tail(w.log)}"


def _wait(workers: list, procs: list, share, name: str, folder: Path, poll_s: float, progress_every_s: float) -> None:
    """Wait for every worker, logging progress; kill one that outlives the time share by :data:`KILL_GRACE_S`."""
    kill_at = share.ends_at + KILL_GRACE_S if share is not None else None
    next_note = time.time() + progress_every_s
    while any(p.poll() is None for p in procs):
        time.sleep(poll_s)
        now = time.time()
        for w, p in zip(workers, procs):
            if p.poll() is None and kill_at is not None and now > kill_at:
                p.kill()
                p.wait()
                w.killed = f"was killed, still running {KILL_GRACE_S:.0f} s after the model's time share ended"
                logger.error("%s: worker %d %s", name, w.worker, w.killed)
        if now >= next_note:
            done = [_rows_in(folder / f"part{w.worker}.jsonl") for w in workers]
            logger.info("%s: %d of %d row(s) sampled (%s)", name, sum(done), sum(len(w.ids) for w in workers),
                        ", ".join(f"worker {w.worker}: {d}/{len(w.ids)}" for w, d in zip(workers, done)))
            next_note = now + progress_every_s
    for w, p in zip(workers, procs):
        w.returncode = p.returncode


def _combine(name: str, scfg: engines.SamplingConfig, ids, keys, store, resumed: int, workers: list,
             wall: float) -> CardsReport:
    """One report for the model (``sampling.csv``'s row): the rows the join brought in (a killed worker's
    included), sums of the workers' reports; ``seconds`` is the slowest card's sampling (the cards sample at once),
    ``load_s`` the slowest start-up."""
    reports = [w.report for w in workers if w.report and "sampled" in w.report]
    total = lambda key: sum(int(r.get(key) or 0) for r in reports)  # noqa: E731
    seconds = max([float(r.get("seconds") or 0) for r in reports], default=0.0)
    undone = sum(not store.is_done(i, k) for i, k in zip(ids, keys))
    sampled = len(ids) - undone - resumed
    used = [int(r["n_used"]) for r in reports if r.get("sampled")]
    report = sampling.SamplingReport(
        model=name, engine="hf", rows=len(ids), resumed=resumed, sampled=sampled, undone=undone,
        n_requested=scfg.n, n_used=min(used, default=scfg.n), empty=total("empty"), retried=total("retried"),
        seconds=round(seconds, 2), rows_per_s=round(sampled / seconds, 3) if seconds else 0.0,
        load_s=max([float(r.get("load_s") or 0) for r in reports], default=0.0))
    return CardsReport(report=report, workers=workers, wall_s=round(wall, 2))


# ---------------------------------------------------------------- the worker


def _work(job: dict) -> dict:
    """Sample one worker's rows into its part file; returns its report (also written to ``job["report"]``)."""
    import torch

    torch.set_num_threads(job["threads"])
    entry = ModelEntry(**job["entry"])
    scfg = engines.SamplingConfig(**job["sampling"])
    store = sampling.PredictionStore(job["folder"], job["name"], job["fingerprint"])
    ids, originals, rewrittens = job["ids"], job["originals"], job["rewrittens"]
    gpus = models.gpu_count()
    four_bit = bool(job["load_in_4bit"])
    todo = sum(not store.is_done(i, sampling.text_key(o, r)) for i, o, r in zip(ids, originals, rewrittens))
    logger.info("worker %d (card %s, pid %d): %d row(s), %d to sample, %s, %d CPU thread(s)", job["worker"],
                job["card"], os.getpid(), len(ids), todo, "4-bit nf4" if four_bit else "16-bit", job["threads"])
    engine = serving.serve(entry, todo, engine="hf", options=engines.EngineOptions(**job["options"]),
                           load_in_4bit=four_bit)
    try:
        share = budget.ModelBudget(ends_at=job["ends_at"]) if job["ends_at"] is not None else None
        report = sampling.sample_rows(engine, ids, originals, rewrittens, scfg, store, job["fallback"], budget=share,
                                      model_name=job["model_name"], progress=False)
        out = {**dataclasses.asdict(report), **dataclasses.asdict(engine.startup)}
    finally:
        engine.close()
    logger.info("worker %d: %d row(s) sampled in %.0f s (%.2f rows/s), %d undone", job["worker"], report.sampled,
                report.seconds, report.rows_per_s, report.undone)
    out.update(four_bit=four_bit, peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpus else None,
               device=torch.cuda.get_device_name(0) if gpus else "cpu")
    return out


def _worker_main(job_path: str) -> int:
    """A worker process: run :func:`_work`, write its report (or the error) beside its part file; 0 when it worked."""
    from .config import setup_logging

    setup_logging()
    job = json.loads(Path(job_path).read_text())
    out = {"worker": job["worker"], "card": job["card"], "pid": os.getpid()}
    code = 0
    try:
        out.update(_work(job))
    except Exception as e:
        logger.error("worker %d failed: %s: %s\n%s", job["worker"], type(e).__name__, e, traceback.format_exc())
        out["error"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        code = 1
    artifacts.write_json(job["report"], out)
    return code


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1]))
