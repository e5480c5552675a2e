"""LoRA training on tiny random models in the real architectures (Llama, Mistral, Mixtral), through the presets.

Asserts real effects: adapter weights change, base weights do not, the loss mask is the answer, our own pad token,
checkpoints with metrics, resume. Run: `pytest tests/test_training.py`.
"""
from __future__ import annotations

import json

import pytest
import torch

from kaggle_utils import artifacts, callbacks, config, training
from conftest import GEMMA_CSV


def tiny_cfg(tmp_path, base, preset="mistral-7b", **kw):
    values = dict(run_name="tiny", runs_dir=str(tmp_path), preset=preset, base_model_path=str(base),
                  train_files=[str(GEMMA_CSV)], validation_file=str(GEMMA_CSV), val_rows=4, max_train_rows=8,
                  max_steps=2, batch_size=2, micro_batch_size=2, save_steps=1, max_seq_length=512,
                  load_in_4bit=False, learning_rate=1e-2, warmup_steps=0)
    values.update(kw)
    return training.TrainConfig(**values)


def _train(cfg):
    training.prepare_run(cfg)
    return training.load_for_training(cfg)


@pytest.mark.parametrize("arch,preset", [("llama", "llama2-13b"), ("mistral", "mistral-7b"),
                                         ("mixtral", "mixtral-8x7b")])
def test_two_steps_change_adapter_not_base(tmp_path, tiny_model_dir, arch, preset):
    cfg = tiny_cfg(tmp_path, tiny_model_dir(arch), preset=preset)
    model, tok, trainer = _train(cfg)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    assert lora and all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    training.train(cfg, trainer)
    after = dict(model.named_parameters())
    assert any(not torch.equal(lora[n], after[n]) for n in lora if "lora_B" in n), "LoRA B never moved"
    assert all(torch.equal(base[n], after[n]) for n in base), "a base weight changed"
    # rank 1 on the preset's modules
    a = next(p for n, p in after.items() if "lora_A" in n)
    assert a.shape[0] == 1
    targets = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in after if "lora_A" in n}
    assert targets == set(__import__("kaggle_utils.models", fromlist=["x"]).get_preset(preset).lora_target_modules)


def test_loss_mask_is_the_answer_and_pad_is_our_own(tmp_path, tiny_model_dir):
    cfg = tiny_cfg(tmp_path, tiny_model_dir("llama"))
    _, tok, trainer = _train(cfg)
    assert tok.pad_token_id != tok.eos_token_id
    assert trainer.data_collator.pad_token_id == tok.pad_token_id
    prompts_seen = 0
    for ex in trainer.train_dataset:
        labelled = [t for t in ex["labels"] if t != -100]
        assert labelled[-1] == tok.eos_token_id
        text = tok.decode(labelled[:-1])
        assert "Rewritten text" not in text and len(text) > 3
        # everything before the first labelled token is the prompt, ending with the response marker
        first = next(i for i, t in enumerate(ex["labels"]) if t != -100)
        assert tok.decode(ex["input_ids"][:first]).endswith("<|im_start|>assistant\n")
        assert all(t == -100 for t in ex["labels"][:first])
        prompts_seen += 1
    assert prompts_seen == 8
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    short = int(batch["attention_mask"].sum(1).argmin())
    pads = batch["input_ids"][short][batch["attention_mask"][short] == 0]
    assert len(pads) and bool((pads == tok.pad_token_id).all())  # right padding with the own pad token


def test_run_folder_outputs_and_resume(tmp_path, tiny_model_dir):
    cfg = tiny_cfg(tmp_path, tiny_model_dir("mistral"))
    _, _, trainer = _train(cfg)
    training.train(cfg, trainer)
    run = cfg.run_dir
    assert json.loads((run / "config.json").read_text())["preset"] == "mistral-7b"
    ckpts = artifacts.find_checkpoints(run)
    assert [c.name for c in ckpts.values()] == ["checkpoint-1", "checkpoint-2"] and list(ckpts) == [1, 2]
    for c in ckpts.values():
        assert (c / "adapter_model.safetensors").exists() and (c / "adapter_config.json").exists()
        assert not list(c.glob("model*.safetensors"))  # adapter only, never the base weights
        meta = json.loads((c / "metrics.json").read_text())
        assert meta["step"] == int(c.name.split("-")[1]) and meta["eval_loss"] > 0
    steps = [s for s, _ in artifacts.eval_losses(run)]
    assert steps == [0, 1, 2]  # step 0 is the base model
    assert artifacts.plot_losses(run).stat().st_size > 1000
    assert len(__import__("pandas").read_csv(run / "validation.csv")) >= 4
    # "interrupted" after step 2: asking for 3 steps resumes from checkpoint-2 and only does one more
    cfg3 = tiny_cfg(tmp_path, tiny_model_dir("mistral"), max_steps=3)
    _, _, trainer3 = _train(cfg3)
    training.train(cfg3, trainer3)
    assert trainer3.state.global_step == 3
    assert list(artifacts.find_checkpoints(run))[-1] == 3


def test_run_folder_of_another_model_is_refused(tmp_path, tiny_model_dir):
    cfg = tiny_cfg(tmp_path, tiny_model_dir("mistral"))
    _, _, trainer = _train(cfg)
    training.train(cfg, trainer)
    other = tiny_cfg(tmp_path, tiny_model_dir("mistral"), lora_r=4)
    with pytest.raises(ValueError, match="different run.*lora_r: 1 -> 4"):
        training.prepare_run(other)
    # another split would put trained prompts into the held-out rows
    with pytest.raises(ValueError, match="different run.*lora_layers: 0 -> 1"):
        training.prepare_run(tiny_cfg(tmp_path, tiny_model_dir("mistral"), lora_layers=1))
    with pytest.raises(ValueError, match="different run.*report_rows: 0 -> 10"):
        training.prepare_run(tiny_cfg(tmp_path, tiny_model_dir("mistral"), report_rows=10))
    # a config.json written before lora_target_modules existed, and "" vs the same layers by name, still resume
    saved = json.loads((cfg.run_dir / "config.json").read_text())
    del saved["lora_target_modules"]
    (cfg.run_dir / "config.json").write_text(json.dumps(saved))
    named = ",".join(__import__("kaggle_utils.models", fromlist=["x"]).get_preset("mistral-7b").lora_target_modules)
    training.prepare_run(tiny_cfg(tmp_path, tiny_model_dir("mistral"), lora_target_modules=named))


@pytest.mark.parametrize("field,value,match", [
    ("max_steps", 0, "max_steps: must be >= 1"),
    ("batch_size", 3, "batch_size: must be a multiple"),
    ("preset", "gpt-5", "unknown preset"),
    ("train_files", [], "train_files: give at least one CSV"),
    ("lr_scheduler", "cosin", "lr_scheduler: must be one of"),
    ("lora_target_modules", "q_proj,qkv", r"lora_target_modules: unknown module\(s\) \['qkv'\]"),
    ("max_prompt_tokens", 10, "max_prompt_tokens: must be 0"),
    ("report_rows", -1, "report_rows: must be >= 0"),
    ("lora_layers", -1, "lora_layers: must be >= 0"),
    ("cpu_threads", -1, "cpu_threads: must be >= 0"),
    ("lora_dropout", 1.0, r"lora_dropout: must be in \[0, 1\)"),
    ("neftune_noise_alpha", -5, "neftune_noise_alpha: must be >= 0"),
    ("weight_decay", -0.1, "weight_decay: must be >= 0"),
])
def test_bad_config_values(tmp_path, tiny_model_dir, field, value, match):
    with pytest.raises(config.ConfigError, match=match):
        tiny_cfg(tmp_path, tiny_model_dir("llama"), **{field: value})


def test_the_training_seed_draws_the_lora_initialisation(tmp_path, tiny_model_dir):
    """Two loads with the same seed start from the same LoRA A matrices (so runs paired by seed start alike, and
    data-parallel processes too); another seed starts elsewhere."""
    def lora_a(seed: int) -> list:
        model, _ = training.load_model_and_tokenizer(tiny_cfg(tmp_path, tiny_model_dir("llama"), seed=seed))
        torch.manual_seed(1234)  # what runs between two loads draws on the global generator
        return [p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n]

    first, again, other = lora_a(0), lora_a(0), lora_a(1)
    assert first and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))


def test_missing_training_file_is_named(tmp_path, tiny_model_dir):
    from kaggle_utils.data import DataError

    cfg = tiny_cfg(tmp_path, tiny_model_dir("llama"), train_files=[str(tmp_path / "missing.csv")])
    training.prepare_run(cfg)
    _, tok = training.load_model_and_tokenizer(cfg)
    with pytest.raises(DataError, match="missing.csv: file does not exist"):
        training.build_datasets(cfg, tok)


@pytest.mark.parametrize("value,expected", [("", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                                            ("all", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]),
                                            ("q_proj, v_proj", ["q_proj", "v_proj"])])
def test_lora_targets_preset_group_or_names(tmp_path, tiny_model_dir, value, expected):
    cfg = tiny_cfg(tmp_path, tiny_model_dir("llama"), preset="smollm2-135m", lora_target_modules=value)
    assert cfg.target_modules == expected


def test_lora_in_the_last_layers_only(tmp_path, tiny_model_dir):
    """lora_layers=1 on a 2-layer model: the adapter lives in the last layer only, it trains, and (no activation
    checkpointing) the backward pass never runs through the first layer."""
    cfg = tiny_cfg(tmp_path, tiny_model_dir("mistral"), lora_layers=1)
    model, _, trainer = _train(cfg)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(".layers.1." in n for n in lora), sorted(lora)[:4]
    backward = {0: 0, 1: 0}
    for i in backward:
        model.base_model.model.model.layers[i].register_full_backward_hook(
            lambda *_, i=i: backward.__setitem__(i, backward[i] + 1))
    training.train(cfg, trainer)
    assert backward[0] == 0 and backward[1] > 0, backward
    after = dict(model.named_parameters())
    assert any(not torch.equal(lora[n], after[n]) for n in lora if "lora_B" in n), "LoRA B never moved"
    saved = json.loads((training.find_last_checkpoint(cfg.run_dir) / "adapter_config.json").read_text())
    assert saved["layers_to_transform"] == [1]


def test_neftune_noise_and_weight_decay_reach_the_training_steps(tmp_path, tiny_model_dir):
    """neftune_noise_alpha: while the trainer steps, the same token ids embed differently twice (noise on the
    input embeddings) and after training they embed the same again; weight_decay: the optimizer decays the LoRA
    weights by that much."""
    from transformers import TrainerCallback

    cfg = tiny_cfg(tmp_path, tiny_model_dir("llama"), neftune_noise_alpha=5.0, weight_decay=0.1)
    model, _, trainer = _train(cfg)
    embed = model.get_input_embeddings()
    ids = torch.tensor([[5, 6, 7, 8]])
    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # the model in train mode, as it stepped
            with torch.no_grad():
                seen.append((bool(embed.training), not torch.equal(embed(ids), embed(ids))))
            decays = {g["weight_decay"] for g in kwargs["optimizer"].param_groups if g["params"]}
            seen.append(decays)

    trainer.add_callback(Probe())
    training.train(cfg, trainer)
    assert seen[0] == (True, True), "no noise on the embeddings while training"
    assert 0.1 in seen[1], seen[1]
    embed.eval()
    with torch.no_grad():
        assert torch.equal(embed(ids), embed(ids)), "the noise outlived training"


def test_lora_layers_beyond_the_model_is_named(tmp_path, tiny_model_dir):
    cfg = tiny_cfg(tmp_path, tiny_model_dir("llama"), lora_layers=3)
    with pytest.raises(config.ConfigError, match="lora_layers: the model has 2 decoder layers, got 3"):
        training.prepare_run(cfg)  # before any model loads or processes fork
    assert not (cfg.run_dir / "config.json").exists()


def test_choice_and_report_rows_are_disjoint_groups_kept_out_of_training(tmp_path, tiny_model_dir):
    """Choice rows (validation.csv) and report rows (report.csv) are whole prompt groups, disjoint, never trained on;
    adding report rows does not move the choice draw; long rows are cut instead of dropped."""
    from kaggle_utils import data

    base = tiny_model_dir("llama")
    plain = tiny_cfg(tmp_path / "a", base, val_rows=6, max_train_rows=0)
    both = tiny_cfg(tmp_path / "b", base, val_rows=6, report_rows=10, max_train_rows=0, max_prompt_tokens=128,
                    max_seq_length=200)
    choice, _ = training.split_held_out_rows(plain)
    choice2, report = training.split_held_out_rows(both)
    key = lambda df: set(df["rewrite_prompt"].map(data.normalize_prompt))  # noqa: E731
    assert choice["id"].tolist() == choice2["id"].tolist()
    assert len(report) >= 10 and not key(choice2) & key(report)
    training.prepare_run(both)
    model, tok = training.load_model_and_tokenizer(both)
    train_ds, _ = training.build_datasets(both, tok)
    written = __import__("pandas").read_csv(both.run_dir / "report.csv")
    assert written["id"].tolist() == report["id"].tolist()
    assert max(len(r) for r in train_ds["input_ids"]) <= 200
    trained = {tok.decode([t for t, m in zip(ids, mask) if m]).replace(tok.eos_token, "").strip().lower()
               for ids, mask in zip(train_ds["input_ids"], train_ds["completion_mask"])}
    assert not {data.normalize_prompt(p) for p in trained} & (key(choice2) | key(report))
    # Weighting a source repeats its training rows after the held-out groups left: still none of their prompts.
    doubled = tiny_cfg(tmp_path / "d", base, val_rows=6, report_rows=10, max_train_rows=0, max_prompt_tokens=128,
                       max_seq_length=200, source_weights="pedromb-gemma7b-eval:2")
    training.prepare_run(doubled)
    doubled_ds, _ = training.build_datasets(doubled, tok)
    assert len(doubled_ds) == 2 * len(train_ds)
    assert sorted(map(tuple, doubled_ds["input_ids"])) == sorted(map(tuple, list(train_ds["input_ids"]) * 2))
    # The same folder again without report rows (checkpoints gone): the earlier report.csv, trained on now, goes.
    again = tiny_cfg(tmp_path / "d", base, val_rows=6, report_rows=0, max_train_rows=0, max_prompt_tokens=128,
                     max_seq_length=200)
    training.prepare_run(again)
    assert (again.run_dir / "report.csv").exists()
    training.build_datasets(again, tok)
    assert not (again.run_dir / "report.csv").exists() and (again.run_dir / "validation.csv").exists()
    # Without the cut, the longer rows (most of the gemma file) are dropped instead.
    dropped = tiny_cfg(tmp_path / "c", base, val_rows=6, report_rows=10, max_train_rows=0, max_seq_length=400)
    training.prepare_run(dropped)
    assert len(training.build_datasets(dropped, tok)[0]) < len(train_ds) / 2


def test_max_prompt_tokens_cuts_every_prompt_and_is_recorded_for_the_later_stages(tmp_path, tiny_model_dir):
    """The first stop of the prompt-token limit (kaggle_utils.artifacts): no trained prompt is longer, and config.json
    records it for checkpoint selection; without it nothing is cut and the run's limit is its max_seq_length."""
    base = tiny_model_dir("llama")
    cut = tiny_cfg(tmp_path / "cut", base, max_prompt_tokens=128, max_seq_length=400)
    training.prepare_run(cut)
    saved = config.saved_config(cut.run_dir)
    assert saved["max_prompt_tokens"] == 128 and artifacts.run_prompt_token_limit(saved) == 128
    _, tok = training.load_model_and_tokenizer(cut)
    train_ds, eval_ds = training.build_datasets(cut, tok)
    prompt_lengths = [list(m).index(1) for ds in (train_ds, eval_ds) for m in ds["completion_mask"]]
    assert 100 < max(prompt_lengths) <= 128  # gemma's texts run to hundreds of tokens: they were cut, not dropped
    whole = tiny_cfg(tmp_path / "whole", base, max_seq_length=400)
    training.prepare_run(whole)
    saved = config.saved_config(whole.run_dir)
    assert saved["max_prompt_tokens"] == 0 and artifacts.run_prompt_token_limit(saved) == 400


@pytest.mark.parametrize("name", ["smollm2-135m", "mistral-7b", "llama2-13b", "mistral-22b", "mixtral-8x7b"])
def test_every_recipe_loads(tiny_model_dir, name):
    cfg = config.load_yaml(training.TrainConfig, f"configs/{name}.yaml", base_model_path=str(tiny_model_dir("llama")))
    assert cfg.preset == name and cfg.max_steps >= 1
    if name != "smollm2-135m":  # the original recipe
        assert (cfg.max_steps, cfg.batch_size, cfg.lora_r, cfg.save_steps) == (500, 16, 1, 25)


def test_recipe_unknown_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: smollm2-135m\nlearning_rat: 0.1\n")
    with pytest.raises(config.ConfigError, match="unknown keys \\['learning_rat'\\]"):
        config.load_yaml(training.TrainConfig, bad)


class _FakeClock:
    """10 s between any two readings: every step takes 10 s, the start-of-training evaluation nothing."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 10.0
        return self.now


def _budget_cut_run(tmp_path, tiny_model_dir, monkeypatch):
    """12 planned steps (a checkpoint every 4, cosine) with a 1-minute budget, trained on a clock of 10 s a step."""
    monkeypatch.setattr(callbacks, "_clock", _FakeClock())
    cfg = tiny_cfg(tmp_path, tiny_model_dir("mistral"), max_steps=12, save_steps=4, logging_steps=1,
                   lr_scheduler="cosine", time_budget_minutes=1.0)
    _, _, trainer = _train(cfg)
    training.train(cfg, trainer)
    return cfg, trainer


def test_time_budget_cuts_steps_keeps_the_checkpoint_count_and_ends_the_schedule(tmp_path, tiny_model_dir,
                                                                                 monkeypatch, caplog):
    """12 planned steps (a checkpoint every 4) at 10 s a step do not fit 1 minute: timed over steps 2-4, the loop
    stops at step 6 with checkpoints every 2 steps, and the cosine schedule reaches 0 there."""
    cfg, trainer = _budget_cut_run(tmp_path, tiny_model_dir, monkeypatch)
    assert trainer.state.global_step == 6
    assert list(artifacts.find_checkpoints(cfg.run_dir)) == [4, 6]  # 4 as planned before the decision, then every 2
    chosen = json.loads((cfg.run_dir / training.BUDGET_FILE).read_text())
    assert (chosen["max_steps"], chosen["save_steps"], chosen["planned_steps"]) == (6, 2, 12)
    assert chosen["seconds_per_step"] == 10.0 and chosen["timed_steps"] == [2, 4]
    assert "training stops at step 6" in caplog.text
    lrs = artifacts.read_metrics(cfg.run_dir).set_index("step")["learning_rate"]
    # stretched to end at 6: at its last step the rate is a 6-step cosine's (0.07 of the peak), where the planned
    # 12-step cosine would still be at 0.63 of it
    assert lrs[6] < 0.1 * cfg.learning_rate and lrs[3] > 0.4 * cfg.learning_rate


def test_time_budget_keeps_a_recipe_that_fits(tmp_path, tiny_model_dir, monkeypatch, caplog):
    monkeypatch.setattr(callbacks, "_clock", _FakeClock())
    cfg = tiny_cfg(tmp_path, tiny_model_dir("mistral"), max_steps=5, save_steps=5, time_budget_minutes=10.0)
    _, _, trainer = _train(cfg)
    training.train(cfg, trainer)
    assert trainer.state.global_step == 5
    assert json.loads((cfg.run_dir / training.BUDGET_FILE).read_text())["max_steps"] == 5
    assert "kept" in caplog.text
    with pytest.raises(config.ConfigError, match="^time_budget_minutes: needs num_processes 1"):
        tiny_cfg(tmp_path, tiny_model_dir("mistral"), time_budget_minutes=5.0, num_processes=2)


def test_time_budget_gives_steps_back_when_the_pace_picks_up(tmp_path, tiny_model_dir, monkeypatch, caplog):
    """Early steps slow (20 s), later ones fast (2 s): the first decision cuts hard, a later check gives steps back."""
    ticks = iter([20.0] * 6 + [2.0] * 500)

    class Clock:
        now = 0.0

        def __call__(self):
            self.now += next(ticks)
            return self.now

    monkeypatch.setattr(callbacks, "_clock", Clock())
    cfg = tiny_cfg(tmp_path, tiny_model_dir("mistral"), max_steps=30, save_steps=10, lr_scheduler="cosine",
                   time_budget_minutes=3.0)
    _, _, trainer = _train(cfg)
    training.train(cfg, trainer)
    decisions = [int(r.getMessage().split("training stops at step ")[1].split(" ")[0]) for r in caplog.records
                 if "training stops at step" in r.getMessage()]
    assert len(decisions) >= 2 and decisions == sorted(decisions) and decisions[-1] > decisions[0], decisions
    final = json.loads((cfg.run_dir / training.BUDGET_FILE).read_text())["max_steps"]
    assert trainer.state.global_step == final >= decisions[-1]  # at 2 s a step the whole recipe fits again


# ---------------------------------------------------------------- the time budget's callback, step by step


class _SetClock:
    """A clock that says what the test sets."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _loop_state(max_steps: int, save_steps: int):
    from types import SimpleNamespace

    return SimpleNamespace(max_steps=max_steps, save_steps=save_steps, eval_steps=save_steps, global_step=0,
                           is_world_process_zero=True)


def _cosine(steps: int):
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return get_cosine_schedule_with_warmup(optimizer, 0, steps)


def _budget_loop(tmp_path, monkeypatch, max_steps: int, save_steps: int):
    """A time budget of 10 minutes for ``max_steps`` planned steps (a checkpoint every ``save_steps``, cosine), begun
    on a clock the test sets: (cfg, clock, loop state, scheduler, callback)."""
    clock = _SetClock()
    monkeypatch.setattr(callbacks, "_clock", clock)
    cfg = training.TrainConfig(run_name="budget", runs_dir=str(tmp_path), train_files=["x.csv"], max_steps=max_steps,
                               save_steps=save_steps, lr_scheduler="cosine", time_budget_minutes=10.0)
    cfg.run_dir.mkdir(parents=True)
    state, scheduler = _loop_state(max_steps, save_steps), _cosine(max_steps)
    callback = callbacks.time_budget_callback(cfg)
    callback.on_train_begin(None, state, None, lr_scheduler=scheduler)
    return cfg, clock, state, scheduler, callback


def _run_steps(callback, state, clock, scheduler, times: dict[int, float], evals: dict[int, float]):
    """Step ends at ``times[step]``; after the steps in ``evals``, an evaluation that ends at that time."""
    from types import SimpleNamespace

    for step in sorted(times):
        state.global_step, clock.now = step, times[step]
        control = SimpleNamespace(should_training_stop=False)
        callback.on_step_end(None, state, control, lr_scheduler=scheduler)
        if step in evals:
            clock.now = evals[step]
            callback.on_evaluate(None, state, control)


def test_the_time_budget_takes_evaluations_out_of_the_pace_and_projects_them(tmp_path, monkeypatch):
    """20 planned steps, a checkpoint (and evaluation) every 2, a 10-minute budget. Steps take 10 s; the evaluation
    after step 2 takes 100 s. Timed over steps 2-4: 10 s a step once the 100 s are taken out, and each of the
    remaining checkpoints' evaluations costs 100 s. By hand, at 140 s spent after step 4, ending at step m costs
    140 + 10 (m - 4) + 10 (m - 4) / m x 100 s: 598.6 s for m = 7, 680 s for m = 8, so 7 steps fit. (Had the
    evaluation stayed in the pace, 43.3 s a step, only 6 would; had the evaluations been left out of the projection,
    all 20 would.)"""
    cfg, clock, state, scheduler, callback = _budget_loop(tmp_path, monkeypatch, 20, 2)
    _run_steps(callback, state, clock, scheduler, {1: 10.0, 2: 20.0, 3: 130.0, 4: 140.0}, {2: 120.0})
    record = json.loads((cfg.run_dir / training.BUDGET_FILE).read_text())
    assert (record["seconds_per_step"], record["evaluation_seconds"], record["timed_steps"]) == (10.0, 100.0, [2, 4])
    assert (record["max_steps"], record["save_steps"], record["planned_steps"]) == (7, 1, 20)
    assert record["planned_minutes"] == 18.3  # all 20 steps: 140 + 16 x 10 + 10 x 16 / 20 x 100 = 1100 s
    assert (state.max_steps, state.save_steps, state.eval_steps) == (7, 1, 1)
    assert [f.keywords["num_training_steps"] for f in scheduler.lr_lambdas] == [7]  # the schedule ends at step 7


def test_the_time_budget_holds_its_last_step_through_the_pace_s_jitter(tmp_path, monkeypatch, caplog):
    """100 planned steps (a checkpoint every 50) in 10 minutes. The pace measured at the rechecks jitters: 6.10, 6.04,
    6.16, 6.10 s a step, which by itself would end the run at step 98, 99, 97, 98 with a checkpoint every 49, 50, 49,
    49 steps (a checkpoint at 49 and another at 50). The first decision holds through the jitter; when the pace picks
    up to 5 s a step the whole recipe fits again, and the budget says so."""
    cfg, clock, state, scheduler, callback = _budget_loop(tmp_path, monkeypatch, 100, 50)
    # the rechecks come at steps 4, 9, 14, 19, 24 (every 5 steps after 3 timed ones); the pace is timed from step 1
    _run_steps(callback, state, clock, scheduler, {1: 6.1}, {})  # the first step is not timed
    for step, pace in {4: 6.10, 9: 6.04, 14: 6.16, 19: 6.10}.items():  # by hand: 6.04 alone fits 99 steps, 6.16 97
        _run_steps(callback, state, clock, scheduler, {step: 6.1 + (step - 1) * pace}, {})
        assert (state.max_steps, state.save_steps) == (98, 49), step
    decisions = [r.getMessage() for r in caplog.records if "training stops at step" in r.getMessage()]
    assert len(decisions) == 1 and "training stops at step 98 (a checkpoint every 49 steps" in decisions[0]
    assert json.loads((cfg.run_dir / training.BUDGET_FILE).read_text())["max_steps"] == 98

    _run_steps(callback, state, clock, scheduler, {24: 6.1 + 23 * 5.0}, {})  # 5 s a step: 120 steps would fit
    assert (state.max_steps, state.save_steps) == (100, 50)
    assert json.loads((cfg.run_dir / training.BUDGET_FILE).read_text())["max_steps"] == 100
    assert [f.keywords["num_training_steps"] for f in scheduler.lr_lambdas] == [100]


def test_the_time_budget_keeps_the_last_step_s_checkpoint_when_save_steps_does_not_divide_the_steps(tmp_path,
                                                                                                  monkeypatch):
    """175 planned steps with a checkpoint every 88: two checkpoints, at step 88 and at the last step, which training
    saves at its end. At 4 s a step over steps 2-4 (16 s spent), 150 steps fit the 10 minutes (16 + 146 x 4 = 600 s);
    the two checkpoints keep their count, so one every 75 steps, not a single one at step 150."""
    cfg, clock, state, scheduler, callback = _budget_loop(tmp_path, monkeypatch, 175, 88)
    _run_steps(callback, state, clock, scheduler, {1: 4.0, 2: 8.0, 3: 12.0, 4: 16.0}, {})
    assert (state.max_steps, state.save_steps) == (150, 75)
    assert json.loads((cfg.run_dir / training.BUDGET_FILE).read_text())["save_steps"] == 75


def test_a_resumed_run_keeps_the_steps_its_budget_json_recorded(tmp_path, monkeypatch, caplog):
    """The first run decided 7 steps and was interrupted; the resumed one, on a far slower clock, neither measures
    again nor rewrites budget.json: it trains to the recorded step with the recorded checkpoints and schedule. A
    budget.json of another recipe or budget is measured anew."""
    cfg, clock, state, scheduler, first = _budget_loop(tmp_path, monkeypatch, 20, 2)
    _run_steps(first, state, clock, scheduler, {1: 10.0, 2: 20.0, 3: 130.0, 4: 140.0}, {2: 120.0})
    written = (cfg.run_dir / training.BUDGET_FILE).read_bytes()
    assert json.loads(written)["max_steps"] == 7

    clock.now = 0.0
    resumed, state, scheduler = callbacks.time_budget_callback(cfg), _loop_state(20, 2), _cosine(20)
    resumed.on_train_begin(None, state, None, lr_scheduler=scheduler)
    assert (state.max_steps, state.save_steps) == (7, 1) and "7 steps, as budget.json recorded" in caplog.text
    assert [f.keywords["num_training_steps"] for f in scheduler.lr_lambdas] == [7]
    # 1000 s a step from checkpoint 4 on: measured, it would cut the run at step 5
    _run_steps(resumed, state, clock, scheduler, {5: 1000.0, 6: 2000.0, 7: 3000.0}, {6: 4000.0})
    assert state.max_steps == 7 and (cfg.run_dir / training.BUDGET_FILE).read_bytes() == written

    other = training.TrainConfig(run_name="budget", runs_dir=str(tmp_path), train_files=["x.csv"], max_steps=30,
                                 save_steps=3, lr_scheduler="cosine", time_budget_minutes=10.0)
    clock.now, state = 0.0, _loop_state(30, 3)
    anew = callbacks.time_budget_callback(other)
    anew.on_train_begin(None, state, None, lr_scheduler=_cosine(30))
    assert state.max_steps == 30  # another recipe's record is not this run's
    _run_steps(anew, state, clock, _cosine(30), {1: 10.0, 2: 20.0, 3: 30.0, 4: 40.0}, {})
    assert json.loads((cfg.run_dir / training.BUDGET_FILE).read_text())["planned_steps"] == 30


def test_time_budget_on_a_real_resume_from_a_checkpoint(tmp_path, tiny_model_dir, monkeypatch, caplog):
    """The budget cut 12 planned steps to 6 (10 s a step on the first run's clock); the run is killed after
    checkpoint 4 (checkpoint 6 lost). Resumed on a clock of 1000 s a step, it reads budget.json back: it stops at
    step 6 again, with a checkpoint there, and the file stays as the first run wrote it."""
    import shutil

    cfg, trainer = _budget_cut_run(tmp_path, tiny_model_dir, monkeypatch)
    assert trainer.state.global_step == 6
    written = (cfg.run_dir / training.BUDGET_FILE).read_bytes()
    shutil.rmtree(cfg.run_dir / "checkpoint-6")

    class Slow:
        now = 0.0

        def __call__(self):
            self.now += 1000.0
            return self.now

    monkeypatch.setattr(callbacks, "_clock", Slow())
    caplog.clear()
    _, _, trainer = _train(cfg)
    training.train(cfg, trainer)
    assert "resuming from checkpoint-4" in caplog.text and "6 steps, as budget.json recorded" in caplog.text
    assert trainer.state.global_step == 6 and list(artifacts.find_checkpoints(cfg.run_dir)) == [4, 6]
    assert (cfg.run_dir / training.BUDGET_FILE).read_bytes() == written
    assert artifacts.read_metrics(cfg.run_dir).set_index("step")["learning_rate"][6] < 0.1 * cfg.learning_rate
