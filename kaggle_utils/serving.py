"""Serving one model of the plan: which engine runs it, whether vLLM gets a merged copy, and the engine started.

:func:`serve` is the one call the inference and select stages make. For one :class:`kaggle_utils.plan.ModelEntry`:

1. the adapter is resolved once (:func:`kaggle_utils.adapters.selected_adapter`: none when the base model won the
   selection), and the folder to serve is its base, or ``<adapter>/merged`` with ``use_merged``;
2. the engine is chosen (:func:`pick_engine`): vLLM only where CUDA is there and vLLM imports, so a merge is never
   paid for an engine that cannot start; ``auto`` weighs the served folder against the cards (:func:`auto_choice`);
3. for vLLM, the adapter may be merged into a 16-bit copy of its base on local disk first (:func:`merge_decision`;
   :func:`merged_copy_for_vllm`), which then needs no LoRA kernels; a failed merge serves the adapter as a
   ``LoRARequest``;
4. the engine starts (:func:`load_engine`); vLLM failing to start is logged (saying so when it was to serve a merged
   copy) and the HF engine serves the same folders, so the engine never costs the submission.

The engine comes back with its :class:`kaggle_utils.engines.Startup`: merged or not, seconds merging and starting
(``sampling.csv``'s columns). A wrong plan (a missing folder, an adapter of another model, a bad setting) is raised
(:data:`PLAN_ERRORS`), for the user to fix.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

from . import adapters, decoding, engines, models
from .adapters import AdapterError
from .config import ConfigError, error_summary, require, resolve_path
from .plan import ModelEntry

logger = logging.getLogger("kaggle_utils")

ENGINES = ("auto", "vllm", "hf")
# auto's rule where both engines can run (the numbers: BENCHMARKS.md, "Which engine, on which card"): up to this share
# of all the cards' memory, vLLM (tensor parallel); above it the HF engine. Below models.ONE_CARD_SHARE of one card,
# the HF engine's fast path.
ALL_CARDS_SHARE = 0.8
# Errors of the plan itself (a missing folder, an adapter of another model, a bad setting): the user's to fix, never
# papered over by a fallback.
PLAN_ERRORS = (ConfigError, AdapterError, models.ModelPathError)


# ---------------------------------------------------------------- the one call


def serve(entry: ModelEntry, rows: int = 0, engine: str = "auto", merge_adapters: str = "auto",
          merge_dir: str | os.PathLike = "", options: engines.EngineOptions | None = None,
          load_in_4bit: bool | None = None) -> engines.Engine:
    """``entry`` loaded and ready to sample ``rows`` rows: engine ``engine`` (auto | vllm | hf), for vLLM the adapter
    merged into a copy of its base in ``merge_dir`` when ``merge_adapters`` says so, loaded with ``options``; the
    engine's ``startup`` says whether vLLM serves a merged copy and how many seconds the merge and the start took.
    ``load_in_4bit`` None is the preset's choice where a GPU runs it (on CPU bitsandbytes is slow and the small models
    fit); the select stage passes what its run trained with."""
    adapter = "" if entry.use_merged else adapters.selected_adapter(entry.adapter, entry.preset)
    weights, merged = entry.merged_folder or entry.base_model, entry.use_merged
    kind = pick_engine(engine, entry.preset, weights)
    start = time.time()
    if kind == "vllm" and adapter:
        copy = merged_copy_for_vllm(entry, adapter, rows, merge_adapters, merge_dir)
        if copy:
            weights, adapter, merged = copy, "", True
    merge_s = time.time() - start
    served = load_engine(kind, entry.preset, weights, adapter, options=options, load_in_4bit=load_in_4bit,
                         merged=merged)
    load_s = time.time() - start - merge_s
    served.startup = engines.Startup(merged=merged and served.name == "vllm", merge_s=round(merge_s, 1),
                                     load_s=round(load_s, 1))
    logger.info("%s: ready in %.0f s (merge %.0f s, engine start %.0f s)", entry.name, merge_s + load_s, merge_s,
                load_s)
    return served


def load_engine(kind: str, preset: str, weights: str = "", adapter: str = "",
                options: engines.EngineOptions | None = None, load_in_4bit: bool | None = None,
                merged: bool = False) -> engines.Engine:
    """Start engine ``kind`` ("hf" or "vllm") on the folder ``weights`` ("" = the preset's base; ``merged``: a merged
    copy, served with no adapter) with the checked ``adapter`` ("" = none) and ``options`` (default
    :class:`kaggle_utils.engines.EngineOptions`).

    When vLLM fails to start (a driver too old for its CUDA, out of memory, a config it refuses) the error is logged
    and the same folders load in the HF engine, a merged copy made for vLLM included: the engine can never cost the
    submission. A wrong plan (:data:`PLAN_ERRORS`) is raised instead, for the user to fix.
    """
    if kind == "vllm":
        try:
            return engines.VLLMEngine.from_preset(preset, weights, adapter, options=options)
        except PLAN_ERRORS:
            raise
        except Exception as e:
            logger.error("vLLM failed to start for %s (%s: %s); falling back to the HF engine for this model%s\n%s",
                         Path(weights).name if weights else preset, type(e).__name__, error_summary(e),
                         ", on the merged copy" if merged else "", traceback.format_exc())
            models.free_gpu_memory()
    spec = models.get_preset(preset)
    # 4-bit only where the preset wants it and a GPU runs it: on CPU bitsandbytes is slow and the small models fit.
    four_bit = (spec.load_in_4bit and models.gpu_count() > 0) if load_in_4bit is None else load_in_4bit
    return engines.HFEngine.from_preset(preset, weights, adapter, load_in_4bit=four_bit, options=options)


# ---------------------------------------------------------------- choosing an engine


def vllm_import_error() -> str:
    """"" when ``vllm.LLM`` imports; otherwise why not (the first line of the error)."""
    try:
        from vllm import LLM  # noqa: F401
    except Exception as e:  # ImportError, or a CUDA/torch mismatch raised while importing
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return ""


def auto_choice(weights_gib: float, cards_gib: list[float], fast_path: bool, four_bit: bool) -> tuple[str, str]:
    """``auto``'s engine for one model where both engines can run, and why.

    - The 16-bit weights fit one card with room to spare (:func:`kaggle_utils.models.fits_one_card`), the HF engine's
      fast path takes the model (a plain Llama/Mistral) and the preset is not 4-bit: the HF engine, on one card. On
      one H200 it sampled Mistral-7B's 1300 rows in 20.8 s (62.4 rows/s, n=1; 40.6 at n=4) after seconds of loading
      and 16 s of compile, while vLLM starts in 31-213 s, and merged needs a 26 s merge first: the HF engine is done
      first.
    - Else the weights fit all the cards (``ALL_CARDS_SHARE``): vLLM, tensor parallel where the heads split (Mistral-7B
      on Kaggle's two 15 GB T4s). The HF engine would split the layers over the cards: 7.4 rows/s on two H200s.
    - Else: the HF engine, which loads a 4-bit preset in 4 bits (vLLM would load the 16-bit weights).
    """
    one, total = min(cards_gib), sum(cards_gib)
    size = f"{weights_gib:.1f} GiB of 16-bit weights"
    if fast_path and not four_bit and models.fits_one_card(weights_gib, cards_gib):
        return "hf", (f"{size} fit one {one:.0f} GiB card: the HF engine's fast path, which starts in seconds "
                      "where vLLM takes minutes")
    if weights_gib <= ALL_CARDS_SHARE * total:
        if len(cards_gib) > 1 and weights_gib > ALL_CARDS_SHARE * one:
            return "vllm", f"{size} need vLLM's tensor parallel over {len(cards_gib)} cards of {one:.0f} GiB"
        hf_why = "would run this preset in 4 bits" if four_bit else (
            "has no fast path for this model type" if not fast_path else "would not leave room to batch")
        return "vllm", f"{size} on a {one:.0f} GiB card, where the HF engine {hf_why}"
    return "hf", (f"{size} do not fit {len(cards_gib)} card(s) of {one:.0f} GiB" +
                  (": the HF engine loads them in 4 bits" if four_bit else ": the HF engine spreads the layers"))


def pick_engine(requested: str = "auto", preset: str = "", weights: str = "") -> str:
    """"vllm" or "hf" for one model, and the log says which and why.

    ``auto`` takes the HF engine when there is no CUDA, ``vllm.LLM`` does not import, or an earlier check ruled vLLM
    out (the Kaggle install check sets ``KAGGLE_UTILS_NO_VLLM``, :mod:`kaggle_utils.wheels`); otherwise, given the
    model (``preset`` and the folder it would serve, ``weights``: its base, or a merged copy), :func:`auto_choice`
    picks by the cards and the weights' size, and without one it takes vLLM. ``vllm`` asked for where it cannot run
    is logged as an error and runs the HF engine: a submission must never be lost to the engine choice.
    """
    import torch

    from .wheels import NO_VLLM_ENV

    require(requested in ENGINES, "engine", f"must be one of {ENGINES}, got '{requested}'")
    if requested == "hf":
        logger.info("engine: hf (asked for)")
        return "hf"
    why_not = os.environ.get(NO_VLLM_ENV, "")
    if not why_not:
        why_not = "no CUDA device" if not torch.cuda.is_available() else vllm_import_error()
    if requested == "vllm":
        if why_not:
            logger.error("engine: 'vllm' was asked for but cannot run here (%s); using the HF engine instead", why_not)
            return "hf"
        logger.info("engine: vllm (asked for)")
        return "vllm"
    if why_not:
        logger.info("engine: hf (auto; vLLM not used: %s)", why_not)
        return "hf"
    if not preset:
        logger.info("engine: vllm (auto; CUDA and vLLM available)")
        return "vllm"
    spec = models.get_preset(preset)
    base = models.resolve_base_path(spec, weights)  # a missing folder is the plan's error: raised
    try:
        model_type = str(models._config_json(base).get("model_type", ""))
        kind, why = auto_choice(models.weights_bytes(base) / 2**30, models.card_memory_gib(),
                                model_type in decoding.SUPPORTED_MODEL_TYPES, spec.load_in_4bit)
    except Exception as e:  # an unreadable folder or card: vLLM, which falls back to the HF engine if it must
        kind, why = "vllm", f"the model's size could not be weighed ({type(e).__name__}: {e})"
    logger.info("engine: %s (auto, %s: %s)", kind, preset, why)
    return kind


# ---------------------------------------------------------------- the merged copy for vLLM


MERGE_CHOICES = ("auto", "on", "off")
# auto merges for vLLM on a card below compute capability 8.0 (a T4), or when the model samples at least this many
# rows. Measured end to end with the T4's settings on one H200 (BENCHMARKS.md, "Merging at kernel start"): the merge
# of Mistral-7B took 26 s, and the merged model sampled 1300 rows at 35.1 rows/s (n=4) against the LoRARequest's
# 20.3, so it pays back from about 870 rows there; a T4 samples about 15x slower while its merge is bound by the disk,
# so it pays back sooner, and the merged model needs no LoRA kernels, the least-tried part of vLLM on Turing.
MERGE_MIN_ROWS = 1000


def _free_disk(folder: Path) -> int:
    """Free bytes on the disk that holds ``folder`` (or its nearest existing parent)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def merge_decision(choice: str, preset: str, base_model_path: str, adapter_path: str, rows: int,
                   merge_dir: str | os.PathLike, capability: tuple[int, int] | None = None,
                   ready: bool = False) -> tuple[bool, str]:
    """Whether vLLM should serve this model merged (the adapter folded into a 16-bit copy of the base, written to
    ``merge_dir``) rather than as a ``LoRARequest``, and why (the caller logs it).

    ``choice`` "off" never merges and "on" always does where it can; "auto" merges on a card of compute capability
    below 8.0 (``capability`` of the first GPU; a T4) or when the model samples at least :data:`MERGE_MIN_ROWS` rows.
    None merges a 4-bit preset (the merged copy would be 16-bit) or without the disk for the copy (weights + 5%).
    A copy that is ``ready`` (:func:`kaggle_utils.adapters.holds_merge`) costs nothing: any choice but "off" serves it.
    """
    require(choice in MERGE_CHOICES, "merge_adapters", f"must be one of {MERGE_CHOICES}, got '{choice}'")
    if choice == "off":
        return False, "merge_adapters is off"
    if not adapter_path:
        return False, "no adapter"
    spec = models.get_preset(preset)
    if spec.load_in_4bit:
        return False, f"preset {preset} runs 4-bit; a merged copy would be 16-bit"
    if ready:
        return True, f"a copy with this adapter merged is already in {merge_dir}"
    base = models.resolve_base_path(spec, base_model_path)
    need, free = models.weights_bytes(base), _free_disk(Path(merge_dir))
    if need * 1.05 > free:
        return False, (f"{need / 2**30:.1f} GiB of merged weights do not fit the {free / 2**30:.1f} GiB free at "
                       f"{merge_dir}")
    disk = f"{need / 2**30:.1f} GiB to write, {free / 2**30:.1f} GiB free at {merge_dir}"
    if choice == "on":
        return True, f"merge_adapters is on; {disk}"
    if capability is not None and capability[0] < 8:
        return True, (f"compute capability {capability[0]}.{capability[1]}: a merged model needs no LoRA kernels and "
                      f"samples faster; {disk}")
    if rows < MERGE_MIN_ROWS:
        return False, (f"{rows} rows to sample, fewer than the {MERGE_MIN_ROWS} from which a merge pays back "
                       "(merge_adapters=on forces it)")
    return True, f"{rows} rows to sample (a merge pays back from {MERGE_MIN_ROWS}); {disk}"


def default_merge_dir() -> Path:
    """Where merged copies go when the config names no folder: the temp dir's ``kaggle_utils_merged`` (on Kaggle the
    local disk, not the 20 GB output)."""
    return Path(tempfile.gettempdir()) / "kaggle_utils_merged"


def merged_copy_for_vllm(entry: ModelEntry, adapter: str, rows: int, merge_adapters: str = "auto",
                         merge_dir: str | os.PathLike = "") -> str:
    """The merged folder vLLM should serve for ``entry`` and its checked ``adapter`` ("" = serve the adapter as a
    ``LoRARequest``), merged here when :func:`merge_decision` says so, into ``merge_dir`` (default
    :func:`default_merge_dir`) under the merge's own key (:func:`kaggle_utils.adapters.merged_copy_folder`). A merge
    that fails is logged, and the adapter is served as is."""
    folder = resolve_path(merge_dir) if merge_dir else default_merge_dir()
    try:
        key = adapters.merge_key(entry.preset, entry.base_model, adapter)
        out = adapters.merged_copy_folder(folder, entry.preset, key)
        merge, why = merge_decision(merge_adapters, entry.preset, entry.base_model, adapter, rows, folder,
                                    models.card_capability(), ready=adapters.holds_merge(out, key))
        logger.info("%s: %s (%s)", entry.name, "served merged into a copy of the base" if merge
                    else "the adapter served as a LoRARequest", why)
        if merge:
            return str(adapters.merge_adapter(entry.preset, entry.base_model, adapter, out, key=key))
        return ""
    except PLAN_ERRORS:
        raise
    except Exception as e:  # out of memory or disk: the LoRARequest still serves the model
        failure = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    # Out of the except block, so the traceback no longer holds the half-merged model's memory.
    logger.error("%s: merging failed (%s); serving the adapter as a LoRARequest", entry.name, failure)
    models.free_gpu_memory()
    return ""
