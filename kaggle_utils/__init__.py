"""kaggle_utils: the support library of the LLM Prompt Recovery notebook bundle.

One job per module, in pipeline order (each stage is a notebook in ``notebooks/`` whose config dataclass lives in the
stage's module):

Shared by every stage
    ``config``       stage configs from notebook parameters or YAML, paths (data/... is the data folder), config.json
    ``sources``      the training data's public sources: pinned files, checksums, the builder behind `make data`
    ``models``       model presets and loading (base path, chat family, dtype, 4-bit, LoRA targets), the chat
                     tokenizer's set-up, the cards (memory, capability, freeing it) and the weights' size
    ``data``         competition-format CSVs: reading, checking, dedup, the split by prompt group
    ``prompts``      the instruction template, tokenization for training and generation, the answer's extraction
    ``metric``       the competition metric (sharpened cosine) and the scorer that embeds with a cache

1. Train (``train.ipynb``)
    ``training``     LoRA / QLoRA fine-tuning with TRL: the model, the split and datasets, the trainer, resuming
    ``callbacks``    the trainer's callbacks: the metrics log, and the time budget that fits the loop to its minutes
    ``distributed``  one process or data-parallel ones (one per GPU) launched from the notebook; what the run ended with
    ``experts``      Mixtral's experts in 4 bits for QLoRA
    ``artifacts``    the run folder's layout and what a run leaves for later stages: validation.csv / report.csv,
                     the metrics log, checkpoint folders, selection.json, max_prompt_tokens
2. Select (``select_checkpoint.ipynb``)
    ``checkpoints``  each checkpoint step scored by the metric on the choice rows (cached), the step or window chosen
    ``export``       the choice written to selected/: one adapter (averaged), selection.json, merged copy, plots
3. Infer (``inference.ipynb``)
    ``engines``      the HF and vLLM engines behind one interface: what to sample, how they load, what starting took
    ``adapters``     LoRA adapter folders: the checks, applying or swapping one in, the merged copy on disk
    ``serving``      one model of the plan served: the engine rule, the merge at start for vLLM, the fallbacks
    ``card_parallel``  the HF engine data-parallel: one copy per card in a process of its own, parts joined in order
    ``decoding``     the HF engine's fast generation on CUDA (static KV cache, CUDA graphs)
    ``sampling``     the sampling loop and the resumable prediction files
    ``budget``       the deadline: each model's share of the time, how many predictions still fit
    ``blending``     the final string, blend.json, the scores table
    ``inference``    the submission stage: sample, blend, write and check submission.csv, score
4. Mean prompt and blend (``mean_prompt.ipynb``)
    ``mean_prompt``  the stage: the mean-prompt search against the scorer, then the blend choice on its rows
    ``blend_choice``  every blend (models, n, order, mean prompt) scored on validation; the best to blend.json
5. Deliver to Kaggle
    ``plan``         the submission plan: one model of it (ModelEntry, also the inference notebook's), variants
    ``kernels``      rendered kernels, their parameters and sources, the local dry run
    ``kaggle_api``   credentials, the datasets, kernel pushes and submissions through the kaggle CLI
    ``wheels``       inside a kernel: the offline vLLM install, checked, with the HF engine as fallback

The inference stage runs twice in the demo: on the choice rows (predictions the mean-prompt stage chooses the blend
on), then with the chosen blend on the report rows. Importing the package is cheap: heavy libraries load inside the
modules that need them.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

__version__ = "0.1.0"


def git_commit() -> str:
    """The bundle's git commit: from a checkout, or from the ``COMMIT`` file a built dataset carries; else "unknown"."""
    here = Path(__file__).resolve().parent
    stamp = here / "COMMIT"
    if stamp.exists():
        return stamp.read_text().strip()
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
