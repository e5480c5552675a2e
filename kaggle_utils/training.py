"""LoRA/QLoRA fine-tuning of one base model with TRL's SFTTrainer: completion-only loss, a checkpoint with eval loss
every ``save_steps``, a metrics log and a loss-curve PNG in ``runs/<run>/``.

Usage (headless): ``make train-smollm`` or ``make train-mistral BASE_MODEL=/path/to/Mistral-7B-Instruct-v0.2``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import artifacts, callbacks, data, models, prompts
# The run folder's files, named in artifacts (importable from here too, as before the layout moved there).
from .artifacts import BUDGET_FILE, METRICS_FILE, REPORT_FILE, VALIDATION_FILE  # noqa: F401
from .config import ConfigError, require, resolve_path, save_config, saved_config

logger = logging.getLogger("kaggle_utils")

# torch.cuda.is_available() asks the CUDA driver by default, and a process that did can no longer fork workers that
# use CUDA ("Cannot re-initialize CUDA in forked subprocess"): data-parallel training forks its processes from the
# notebook kernel (kaggle_utils.distributed.launch). Through NVML the same question leaves CUDA untouched (torch falls
# back to the driver where NVML is missing); without it every multi-GPU launch fails. Set when the training module is
# imported, which train.ipynb does in its first code cell, so no cell before launch can poison the fork.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

DEFAULT_TRAIN_FILES = ["data/extra_rewrites.csv", "data/gemma_rewrites.csv"]
DEFAULT_VALIDATION_FILE = "data/gemma_rewrites.csv"
LR_SCHEDULERS = ("linear", "cosine", "constant_with_warmup")
# Fields that must match for a run folder's checkpoints to be resumed (the rest, e.g. max_steps, may change).
_RESUME_KEYS = ("preset", "base_model_path", "lora_r", "lora_alpha", "lora_target_modules", "lora_layers",
                "max_seq_length", "load_in_4bit",
                # the split: resumed under another one, the report rows could hold prompts the checkpoints trained on
                "validation_file", "val_rows", "report_rows", "val_rows_per_prompt", "split_seed")


@dataclass
class TrainConfig:
    """One fine-tuning run. Every field is a parameter of ``notebooks/train.ipynb``."""

    run_name: str = "smollm"  # output folder: <runs_dir>/<run_name>/
    runs_dir: str = "runs"  # parent of all run folders (gitignored)
    preset: str = "smollm2-135m"  # model preset: smollm2-135m | mistral-7b | llama2-13b | mistral-22b | mixtral-8x7b
    base_model_path: str = ""  # local folder with the base weights; "" = the preset's default (Kaggle input path)
    train_files: list = field(default_factory=lambda: list(DEFAULT_TRAIN_FILES))  # competition-format CSVs to train on
    train_sources: str = ""  # comma-separated `source` values to train on (e.g. only Gemma's rewrites); "" = all rows
    source_weights: str = ""  # comma-separated source:factor pairs: repeat a source's training rows (3 = three times
    # an epoch, 0.5 = a seeded half, 0 = none); "" = every source once
    validation_file: str = DEFAULT_VALIDATION_FILE  # CSV whose held-out prompt groups give eval loss (and later selection)
    val_rows: int = 48  # choice rows of validation_file held out (whole prompt groups): eval loss, step, blend
    report_rows: int = 0  # report rows of validation_file held out (other groups): scored only, never chosen on
    val_rows_per_prompt: int = 2  # at most this many held-out rows per prompt group (0 = all), for more prompts
    split_seed: int = 0  # seed of the prompt-group split (the later stages reuse the written validation.csv)
    dedup_prompts: bool = True  # cap the training rows per distinct prompt at rows_per_prompt
    rows_per_prompt: int = 1  # with dedup_prompts: training rows kept per distinct prompt
    max_train_rows: int = 0  # cap on training rows after filtering (0 = all); small for quick CPU runs
    max_seq_length: int = 0  # longer samples are dropped; 0 = the preset's value
    max_prompt_tokens: int = 0  # prompt-token limit (kaggle_utils.artifacts); 0 = none: drop rows over max_seq_length
    load_in_4bit: bool | None = None  # QLoRA; None = the preset's choice
    lora_r: int = 1  # LoRA rank (the original recipe used 1)
    lora_alpha: int = 16  # LoRA scaling numerator
    lora_dropout: float = 0.0  # dropout on the LoRA input
    neftune_noise_alpha: float = 0.0  # > 0: NEFTune, uniform noise of this scale on the input embeddings while
    # training (transformers' Trainer; off at evaluation and generation); 0 = off
    weight_decay: float = 0.0  # AdamW weight decay on the trainable (LoRA) weights; 0 = none
    lora_target_modules: str = ""  # "" = the preset's; "attention" | "all" | comma-separated module names
    lora_layers: int = 0  # 0 = LoRA in every decoder layer; k = the last k only (without activation checkpointing
    # the backward pass then stops below them)
    max_steps: int = 24  # optimizer steps
    batch_size: int = 8  # effective batch (micro_batch_size x gradient accumulation x num_processes)
    micro_batch_size: int = 4  # rows per forward pass
    learning_rate: float = 2e-3  # peak learning rate
    lr_scheduler: str = "linear"  # decay after warmup: linear | cosine | constant_with_warmup
    warmup_steps: int = 4  # linear warmup steps
    save_steps: int = 8  # checkpoint + eval loss every this many steps
    logging_steps: int = 0  # train loss logged every this many steps; 0 = save_steps // 5 (at least 1)
    seed: int = 0  # training seed (data order, LoRA init)
    time_budget_minutes: float = 0  # > 0: the first steps are timed and max_steps, save_steps and the schedule shrink
    # so the training loop ends within this many minutes (slower machine, fewer steps; budget.json says what it chose)
    gradient_checkpointing: bool = False  # trade compute for memory on big models
    num_processes: int = 1  # data-parallel processes (one per GPU) through accelerate; 1 = this process alone
    cpu_threads: int = 0  # torch CPU threads per data-parallel process; 0 = auto (OMP_NUM_THREADS if set, else 1 per
    # GPU process as accelerate launch and torchrun set, the cores shared out on CPUs); one process keeps torch's
    # default unless set
    profile_steps: int = 0  # time this many steps' phases per process into <run>/step_profile_rank<R>.json (data,
    # forward+backward, DDP's collectives, optimizer, evaluation, saves); 0 = off

    def __post_init__(self):
        preset = models.get_preset(self.preset)
        require(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        require(self.save_steps >= 1, "save_steps", f"must be >= 1, got {self.save_steps}")
        require(self.logging_steps >= 0, "logging_steps", f"must be >= 0 (0 = save_steps // 5), got {self.logging_steps}")
        require(self.micro_batch_size >= 1, "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        require(self.num_processes >= 1, "num_processes", f"must be >= 1, got {self.num_processes}")
        require(self.cpu_threads >= 0, "cpu_threads", f"must be >= 0 (0 = auto), got {self.cpu_threads}")
        require(self.profile_steps >= 0, "profile_steps", f"must be >= 0 (0 = off), got {self.profile_steps}")
        require(self.time_budget_minutes >= 0, "time_budget_minutes",
                f"must be >= 0 (0 = no budget), got {self.time_budget_minutes}")
        require(not (self.time_budget_minutes and self.num_processes > 1), "time_budget_minutes",
                "needs num_processes 1: data-parallel processes would time their steps apart and stop at other steps")
        per_step = self.micro_batch_size * self.num_processes
        require(self.batch_size >= per_step and self.batch_size % per_step == 0, "batch_size",
                f"must be a multiple of micro_batch_size x num_processes = {self.micro_batch_size} x "
                f"{self.num_processes} = {per_step} (the effective batch stays the recipe's), got {self.batch_size}")
        require(self.lora_r >= 1, "lora_r", f"must be >= 1, got {self.lora_r}")
        require(self.lora_layers >= 0, "lora_layers", f"must be >= 0 (0 = every layer), got {self.lora_layers}")
        require(self.val_rows >= 1, "val_rows", f"must be >= 1, got {self.val_rows}")
        require(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        require(0 <= self.lora_dropout < 1, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        require(self.neftune_noise_alpha >= 0, "neftune_noise_alpha",
                f"must be >= 0 (0 = off), got {self.neftune_noise_alpha}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.lr_scheduler in LR_SCHEDULERS, "lr_scheduler",
                f"must be one of {LR_SCHEDULERS}, got '{self.lr_scheduler}'")
        require(self.report_rows >= 0, "report_rows", f"must be >= 0 (0 = none), got {self.report_rows}")
        require(self.rows_per_prompt >= 1, "rows_per_prompt", f"must be >= 1, got {self.rows_per_prompt}")
        require(self.max_prompt_tokens == 0 or self.max_prompt_tokens >= 64, "max_prompt_tokens",
                f"must be 0 (drop long rows) or >= 64, got {self.max_prompt_tokens}")
        require(bool(self.run_name) and "/" not in self.run_name, "run_name", f"must be a folder name, got '{self.run_name}'")
        if isinstance(self.train_files, str):
            self.train_files = [f.strip() for f in self.train_files.split(",") if f.strip()]
        if not isinstance(self.train_sources, str):  # a YAML list is as good as a comma-separated string
            self.train_sources = ",".join(str(s).strip() for s in self.train_sources)
        if not isinstance(self.source_weights, str):  # a YAML mapping is as good as "name:factor,..."
            self.source_weights = ",".join(f"{k}:{v}" for k, v in dict(self.source_weights or {}).items())
        data.parse_source_weights(self.source_weights)  # a malformed entry stops here, naming it
        require(len(self.train_files) > 0, "train_files", "give at least one CSV")
        if self.max_seq_length == 0:
            self.max_seq_length = preset.max_seq_length
        if self.load_in_4bit is None:
            self.load_in_4bit = preset.load_in_4bit
        self.resolve_targets(self.preset, self.lora_target_modules)  # an unknown module name stops here
        # Fail at once (before any heavy import) when the base model is missing.
        models.check_base_path(preset, self.base_model_path)

    @property
    def run_dir(self) -> Path:
        return resolve_path(self.runs_dir) / self.run_name

    @property
    def target_modules(self) -> list[str]:
        """The linear layers that get LoRA: the preset's, or ``lora_target_modules`` (a group name or a list)."""
        return self.resolve_targets(self.preset, self.lora_target_modules)

    @staticmethod
    def resolve_targets(preset: str, lora_target_modules) -> list[str]:
        """``lora_target_modules`` as module names: "" = the preset's, "attention" / "all", or names."""
        value = lora_target_modules.strip() if isinstance(lora_target_modules, str) else ",".join(lora_target_modules)
        if not value:
            return list(models.get_preset(preset).lora_target_modules)
        groups = {"attention": models.ATTENTION_PROJECTIONS, "all": models.ALL_PROJECTIONS}
        if value in groups:
            return list(groups[value])
        names = [v.strip() for v in value.split(",") if v.strip()]
        unknown = [n for n in names if n not in models.ALL_PROJECTIONS]
        require(not unknown, "lora_target_modules", f"unknown module(s) {unknown}; use 'attention', 'all' or names "
                f"from {list(models.ALL_PROJECTIONS)}")
        return names


# ---------------------------------------------------------------- phases


def prepare_run(cfg: TrainConfig) -> Path:
    """Create the run folder and write the resolved config before any work; refuse to mix incompatible runs."""
    run_dir = cfg.run_dir
    saved = saved_config(run_dir)
    if saved is not None and find_last_checkpoint(run_dir):
        prev, now = _resume_view(saved), _resume_view(dataclasses.asdict(cfg))
        diff = [k for k in _RESUME_KEYS if prev.get(k) != now.get(k)]
        if diff:
            raise ValueError(
                f"{run_dir} holds checkpoints of a different run ({', '.join(f'{k}: {prev.get(k)} -> {now.get(k)}' for k in diff)}); "
                "choose another run_name or delete the folder"
            )
    if cfg.lora_layers:  # more layers than the model has stops here too, when its config.json is at hand
        layers = models._config_json(models.check_base_path(models.get_preset(cfg.preset), cfg.base_model_path)).get(
            "num_hidden_layers")
        if layers:
            lora_layer_indices(cfg, int(layers))
    if cfg.train_sources.strip() or cfg.source_weights.strip():  # a source no training file holds stops here,
        # before any model loads or forks
        rows = data.load_training_rows(cfg.train_files, dedup=False, sources=cfg.train_sources)
        data.check_sources(rows, data.parse_source_weights(cfg.source_weights), "source_weights", cfg.train_files)
    save_config(cfg, run_dir)
    return run_dir


def _resume_view(values: dict) -> dict:
    """The resume keys of a saved or current config as they act: a key an older config.json lacks takes the current
    default, and LoRA targets are resolved ("" and "attention" are the same layers for an attention preset)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    view = {k: values.get(k, defaults.get(k)) for k in _RESUME_KEYS}
    try:
        view["lora_target_modules"] = TrainConfig.resolve_targets(str(values.get("preset", "")),
                                                                  view["lora_target_modules"] or "")
    except ConfigError:
        pass  # an unknown preset or module stays as written, and so differs
    return view


def lora_layer_indices(cfg: TrainConfig, num_layers: int) -> list[int] | None:
    """The decoder layers that get LoRA, of a model with ``num_layers``: None (every one) or the last
    ``cfg.lora_layers``.

    Without activation checkpointing, gradients then flow back only through those layers, so a step costs less: on
    2 CPU cores SmolLM2 at r=64 on its last 15 of 30 layers stepped about 1.5x faster (RESULTS.md; it learned less
    per example). With activation checkpointing TRL makes the inputs require gradients, so the backward pass runs
    through every layer and the saving is gone.
    """
    if not cfg.lora_layers:
        return None
    require(cfg.lora_layers <= num_layers, "lora_layers",
            f"the model has {num_layers} decoder layers, got {cfg.lora_layers}")
    return list(range(num_layers - cfg.lora_layers, num_layers))


def load_model_and_tokenizer(cfg: TrainConfig):
    """Base model (4-bit if the config says so) wrapped in a fresh LoRA adapter, and its tokenizer (own pad token)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    preset = models.get_preset(cfg.preset)
    path = models.resolve_base_path(preset, cfg.base_model_path)
    tokenizer, resized = models.load_chat_tokenizer(path, preset.family)
    tokenizer.padding_side = "right"  # training pads on the right; generation switches to left
    dtype = models.compute_dtype()
    if dtype != torch.float32 and not torch.cuda.is_available():
        dtype = torch.float32
    model = models.load_model(preset, path, load_in_4bit=bool(cfg.load_in_4bit), dtype=dtype,
                              for_training=True)
    # The training seed draws what is new here (a <pad> token's embedding row, LoRA's A matrices) as it does the data
    # order: the Trainer seeds itself only once the model exists, and data-parallel processes start alike.
    set_seed(cfg.seed)
    if resized:
        logger.warning("added a <pad> token; resizing embeddings to %d", len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules,
                      layers_to_transform=lora_layer_indices(cfg, model.config.num_hidden_layers),
                      task_type="CAUSAL_LM", bias="none")
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA r=%d on %s in %s: %d trainable of %d parameters", cfg.lora_r, ",".join(cfg.target_modules),
                f"the last {cfg.lora_layers} layers" if cfg.lora_layers else "every layer", trainable, total)
    if cfg.lora_layers and cfg.gradient_checkpointing:
        logger.warning("lora_layers %d with activation checkpointing: the backward pass still runs through every "
                       "layer (TRL makes the inputs require gradients), so the adapter is smaller but a step is not "
                       "faster", cfg.lora_layers)
    return model, tokenizer


def _tokenize(df: pd.DataFrame, tokenizer, max_prompt_tokens: int = 0) -> list[dict]:
    return [prompts.encode_training_example(tokenizer, r.original_text, r.rewritten_text, r.rewrite_prompt,
                                            max_prompt_tokens)
            for r in df.itertuples()]


def split_held_out_rows(cfg: TrainConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The (choice, report) rows of ``validation_file``: disjoint sets of whole prompt groups, seeded.

    Choice rows (``validation.csv``) give the eval loss and, in later stages, choose the checkpoint step, the blend and
    the mean prompt. Report rows (``report.csv``) are only ever scored, so their numbers are free of every choice.
    The choice draw is the same with or without report rows, so adding them does not move an existing split.
    """
    source = data.drop_incomplete(data.read_rewrites(cfg.validation_file))
    rest, choice = data.split_by_prompt(source, cfg.val_rows, seed=cfg.split_seed,
                                        max_per_group=cfg.val_rows_per_prompt)
    report = source.iloc[0:0]
    if cfg.report_rows:
        _, report = data.split_by_prompt(rest, cfg.report_rows, seed=cfg.split_seed + 1,
                                         max_per_group=cfg.val_rows_per_prompt)
    return choice, report


def build_datasets(cfg: TrainConfig, tokenizer):
    """Read, validate, split by prompt group, tokenize and length-filter; write ``validation.csv`` (choice rows) and,
    with ``report_rows``, ``report.csv`` to the run.

    With ``max_prompt_tokens`` a long row is cut the way generation cuts it (``prompts.generation_ids``: the
    instruction kept, both texts trimmed), so it still trains; otherwise rows over ``max_seq_length`` are dropped.
    Returns (train, eval) ``datasets.Dataset`` objects of ``input_ids`` + ``completion_mask``.
    """
    from datasets import Dataset

    validation, report = split_held_out_rows(cfg)
    train = data.load_training_rows(cfg.train_files, dedup=cfg.dedup_prompts, max_per_prompt=cfg.rows_per_prompt,
                                    sources=cfg.train_sources)
    held_out = set(pd.concat([validation, report])["rewrite_prompt"].map(data.normalize_prompt))
    leak = train["rewrite_prompt"].map(data.normalize_prompt).isin(held_out)
    if leak.any():
        logger.info("removed %d training row(s) whose prompt is in the held-out groups", int(leak.sum()))
    train = train.loc[~leak.to_numpy()].reset_index(drop=True)
    train = data.weight_sources(train, cfg.source_weights, seed=cfg.seed, files=cfg.train_files)
    # Shuffle before capping so a small cap still mixes every source.
    train = train.sample(frac=1.0, random_state=cfg.seed).reset_index(drop=True)

    clip = cfg.max_prompt_tokens
    train_rows, val_rows = _tokenize(train, tokenizer, clip), _tokenize(validation, tokenizer, clip)
    if clip:
        logger.info("max_prompt_tokens=%d: %d of %d training prompt(s) were cut to fit", clip,
                    sum(r["truncated"] for r in train_rows), len(train_rows))
    train = data.filter_by_length(train.assign(_enc=train_rows), [len(r["input_ids"]) for r in train_rows],
                                  cfg.max_seq_length)
    evalset = data.filter_by_length(validation.assign(_enc=val_rows), [len(r["input_ids"]) for r in val_rows],
                                    cfg.max_seq_length)
    if cfg.max_train_rows:
        train = train.head(cfg.max_train_rows)
    if len(train) == 0 or len(evalset) == 0:
        raise data.DataError(f"nothing left to train on ({len(train)} train rows, {len(evalset)} eval rows) after "
                             f"the length filter (max_seq_length={cfg.max_seq_length})")
    if is_main_process():  # every process builds the same split; one writes it
        validation.drop(columns=["_file", "_row"]).to_csv(cfg.run_dir / VALIDATION_FILE, index=False)
        if len(report):
            report.drop(columns=["_file", "_row"]).to_csv(cfg.run_dir / REPORT_FILE, index=False)
        elif (cfg.run_dir / REPORT_FILE).exists():  # an earlier run's: its groups are training rows now
            (cfg.run_dir / REPORT_FILE).unlink()
            logger.info("removed %s, an earlier run's report rows: with report_rows=0 they are trained on",
                        cfg.run_dir / REPORT_FILE)
    logger.info("training on %d rows, eval loss on %d choice rows (%d prompt groups -> %s)%s", len(train),
                len(evalset), validation["rewrite_prompt"].map(data.normalize_prompt).nunique(),
                cfg.run_dir / VALIDATION_FILE,
                f"; {len(report)} report rows ({report['rewrite_prompt'].map(data.normalize_prompt).nunique()} "
                f"other groups -> {cfg.run_dir / REPORT_FILE})" if len(report) else "")
    to_ds = lambda df: Dataset.from_list([{k: r[k] for k in ("input_ids", "completion_mask")}  # noqa: E731
                                          for r in df["_enc"]])
    return to_ds(train), to_ds(evalset)


def _compact_lm_head_everywhere() -> None:
    """Let TRL's fused LM head score only the answer positions on CPU too.

    TRL projects just the labelled positions through the LM head when Triton is present, and every position
    otherwise. With completion-only loss most positions are prompt, and SmolLM2's 49k-vocabulary head dominates, so
    on CPU the compact path is 2.5x faster per step (measured: 3 steps of 4 rows, 49 s -> 20 s), with the same loss.
    Only the compaction decision is changed; the kernel choice stays TRL's.
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None or getattr(original, "_kaggle_utils", False):
        return

    def compact(device):
        return True if getattr(device, "type", str(device)) == "cpu" else original(device)

    compact._kaggle_utils = True  # type: ignore[attr-defined]
    trl_utils._use_triton = compact


def build_trainer(cfg: TrainConfig, model, tokenizer, train_ds, eval_ds):
    """TRL's SFTTrainer over pre-tokenized rows, with completion-only loss and our own pad token."""
    import torch
    from trl import SFTConfig

    _compact_lm_head_everywhere()

    # One process: on 2 GPUs the layers are split (models.layer_device_map), so rows per step do not multiply;
    # data-parallel (launch with num_processes > 1) each process adds its micro batch, and accumulation shrinks so
    # the effective batch stays the recipe's.
    per_step, accumulation = batch_split(cfg, models.world_size())
    dtype = models.compute_dtype()
    args = SFTConfig(
        output_dir=str(cfg.run_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.micro_batch_size,
        per_device_eval_batch_size=cfg.micro_batch_size * 2,
        gradient_accumulation_steps=accumulation,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        neftune_noise_alpha=cfg.neftune_noise_alpha or None,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        # Micro batches of similar lengths: far less padding computed (texts range from 50 to 1000+ tokens).
        train_sampling_strategy="group_by_length",
        logging_steps=cfg.logging_steps or max(1, cfg.save_steps // 5),
        eval_strategy="steps",
        eval_steps=cfg.save_steps,
        eval_on_start=True,  # step 0 = the base model's eval loss, so the curve shows what training bought
        save_strategy="steps",
        save_steps=cfg.save_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # On CPU, bf16 autocast is 1.6x faster per training step where the CPU has bf16 instructions (AMX), and
        # slower than fp32 where it has none: models.cpu_dtype checks and logs it. LoRA weights stay fp32.
        bf16=dtype == torch.bfloat16 or (not torch.cuda.is_available() and models.cpu_dtype() == torch.bfloat16),
        fp16=torch.cuda.is_available() and dtype == torch.float16,
        completion_only_loss=True,
        max_length=cfg.max_seq_length,
        packing=False,
        # TRL turns activation checkpointing on by default; it costs a third more compute, so only when asked.
        activation_checkpointing=cfg.gradient_checkpointing,
        # MoE (Mixtral): no load-balancing loss. The router and the experts are frozen (LoRA is on attention), and
        # with the layers split over 2 GPUs TRL adds that loss on another card than the LM loss (a device error).
        router_aux_loss_coef=0.0,
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # LoRA: every trainable weight gets a gradient every step
    )
    logger.info("effective batch %d = %d rows x %d accumulation", per_step * accumulation, per_step, accumulation)
    hooks = [callbacks.metrics_callback(cfg.run_dir)]
    if cfg.time_budget_minutes:
        hooks.append(callbacks.time_budget_callback(cfg))
    trainer = _trainer_class()(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                               processing_class=tokenizer, callbacks=hooks)
    if cfg.profile_steps:  # it reads the DDP wrapper the trainer builds when training begins
        trainer.add_callback(callbacks.step_profile_callback(cfg, trainer))
    return trainer


def _trainer_class():
    """SFTTrainer whose length grouping works in effective batches, so N processes see the same rows per optimizer
    step as one process does.

    transformers groups rows by length in blocks of ``micro batch x accumulation`` of one process: 16 rows on one GPU
    but 8 on two (the same recipe), so the data order, and with it the loss curve, would change with the GPU count.
    With blocks of the effective batch, and a generator of its own seeded with ``data_seed`` (not the global random
    state, which model loading and LoRA's initialisation consume), every process draws the same order and accelerate
    hands process k every k-th micro batch of it: optimizer step s trains on the same rows whatever the number of
    processes.
    """
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from trl import SFTTrainer

    class Trainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, LengthGroupedSampler):
                sampler.batch_size = self.args.train_batch_size * self.args.gradient_accumulation_steps * max(
                    1, self.args.world_size)
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                sampler.generator = torch.Generator().manual_seed(seed)  # each epoch draws on from its state
            elif self.args.world_size > 1:
                logger.warning("the training sampler is %s, not transformers' LengthGroupedSampler: the rows of an "
                               "optimizer step may differ from a one-process run's", type(sampler).__name__)
            return sampler

    return Trainer


def find_last_checkpoint(run_dir: str | Path) -> Path | None:
    """The highest-step checkpoint that was completely written (its adapter and the trainer state to resume from),
    or None."""
    done = [p for p in artifacts.find_checkpoints(run_dir).values() if (p / "trainer_state.json").exists()]
    return done[-1] if done else None


def train(cfg: TrainConfig, trainer) -> dict:
    """Train, resuming from the run's last complete checkpoint if there is one; save the final adapter."""
    last = find_last_checkpoint(cfg.run_dir)
    if last:
        logger.info("resuming from %s", last.name)
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    if not (cfg.run_dir / f"checkpoint-{trainer.state.global_step}").exists():
        trainer.save_model(str(cfg.run_dir / f"checkpoint-{trainer.state.global_step}"))
    return result.metrics


# ---------------------------------------------------------------- one process of one or several


def batch_split(cfg: TrainConfig, processes: int) -> tuple[int, int]:
    """(rows per optimizer micro step over all processes, gradient accumulation steps) that keep the effective batch
    at ``batch_size``: 16 = 2 rows x 2 processes x 4 accumulation on two GPUs, 2 x 1 x 8 on one."""
    per_step = cfg.micro_batch_size * max(1, processes)
    return per_step, max(1, cfg.batch_size // per_step)


def is_main_process() -> bool:
    """True in the process that writes the run's files (rank 0, or the only process)."""
    return int(os.environ.get("RANK", "0")) == 0


def load_for_training(cfg: TrainConfig):
    """Model + LoRA, its tokenizer, and the trainer over the run's datasets: everything :func:`train` needs."""
    model, tokenizer = load_model_and_tokenizer(cfg)
    train_ds, eval_ds = build_datasets(cfg, tokenizer)
    return model, tokenizer, build_trainer(cfg, model, tokenizer, train_ds, eval_ds)


def run(cfg: TrainConfig) -> dict:
    """The whole training of one process: model + LoRA, datasets, trainer, train (resuming). What every data-parallel
    process runs, and what one process runs alone."""
    return train(cfg, load_for_training(cfg)[2])


# ---------------------------------------------------------------- the result


def summarize(cfg: TrainConfig) -> pd.DataFrame:
    """Eval loss per checkpoint, for the notebook's last cell."""
    rows = [{"step": s, "eval_loss": round(v, 4), "checkpoint": (cfg.run_dir / f"checkpoint-{s}").exists()}
            for s, v in artifacts.eval_losses(cfg.run_dir)]
    out = pd.DataFrame(rows)
    if len(out) >= 2:
        first, last = out["eval_loss"].iloc[0], out["eval_loss"].iloc[-1]
        logger.info("eval loss %.4f (step %d) -> %.4f (step %d)%s", first, out["step"].iloc[0], last,
                    out["step"].iloc[-1], "" if last < first else "  (did not drop)")
    if len(out) and not math.isfinite(out["eval_loss"].iloc[-1]):
        raise RuntimeError(f"{cfg.run_dir}: the last eval loss is not finite")
    return out
