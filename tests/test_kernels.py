"""Kaggle delivery's side that needs no account: the plan, rendered kernels, the /kaggle path mapping, the submission
check and the local dry run. The datasets, credentials and the kaggle CLI are tests/test_kaggle_api.py's.

Run: `.venv/bin/python -m pytest -q tests/test_kernels.py` (the dry run is marked slow: `-m "not slow"` skips it).

No test reaches the internet or a real account: each test gets an empty HOME and no KAGGLE_* variables.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from conftest import GEMMA_CSV
from kaggle_utils import kernels, models
from kaggle_utils.plan import KAGGLE_HOURS, ModelEntry, Variant, load_plan
from kaggle_utils.config import ConfigError, resolve_path

REPO = Path(__file__).resolve().parents[1]
REAL_NOTEBOOK = REPO / "notebooks" / "inference.ipynb"
SLUGS = ["mistral-v3-x10", "mmml-v1", "mmml-v1-with-mean-prompt", "mmml-v2", "mmml-v2-with-mean-prompt",
         "my-mistral-7b"]
USER = "fakeuser"

def _real_parameters() -> str:
    """The parameters cell of the real inference notebook, for stand-in notebooks that must take the same parameters."""
    nb = nbformat.read(REAL_NOTEBOOK, as_version=4)
    return next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", [])) + "\n"


def _write_notebook(path: Path, parameters: str) -> Path:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import nbtool
    finally:
        sys.path.pop(0)
    nbtool.build(str(path), [("md", "# Inference (stand-in)"), ("parameters", parameters),
                             ("code", "from kaggle_utils import __version__")])
    return path


@pytest.fixture(autouse=True)
def no_kaggle_account(monkeypatch, tmp_path):
    """An empty HOME and no KAGGLE_* variables: no test can see or use a real account."""
    for name in list(os.environ):
        if (name.startswith("KAGGLE_") and not name.startswith("KAGGLE_UTILS_")) or name.lower() in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(home / ".kaggle"))
    return home


@pytest.fixture()
def plan():
    """The example plan; its kernels are rendered from notebooks/inference.ipynb."""
    p = load_plan(REPO / "configs" / "submissions.yaml")
    assert resolve_path(p.notebook) == REAL_NOTEBOOK
    return p


@pytest.fixture()
def rendered(plan, tmp_path):
    """Every variant rendered for the fake user: {slug: folder}."""
    return {f.name: f for f in kernels.render(plan, USER, tmp_path / "kernels")}


# ---------------------------------------------------------------- the plan


def test_example_plan_has_the_five_submissions_of_the_original_plan_and_the_users_own():
    plan = load_plan()
    assert [v.slug for v in plan.variants] == SLUGS
    by_slug = {v.slug: v for v in plan.variants}
    assert [len(by_slug[s].models) for s in SLUGS] == [1, 4, 4, 4, 4, 1]
    assert by_slug["mistral-v3-x10"].models[0].n == 10
    assert [by_slug[s].use_mean_prompt for s in SLUGS] == [False, False, True, False, True, True]
    # the user's own run: the adapter folder is the run that `make train-mistral` writes (runs/mistral-7b/)
    own = by_slug["my-mistral-7b"].models[0]
    assert (own.preset, own.adapter) == ("mistral-7b", "mistral-7b")
    four = ["mistral-7b", "llama2-13b", "mistral-22b", "mixtral-8x7b"]
    assert [m.preset for m in by_slug["mmml-v1"].models] == four
    assert [m.preset for m in by_slug["mmml-v2"].models] == four
    assert all(m.n == 1 and m.temperature > 0 for m in by_slug["mmml-v2"].models)
    assert all(0 < v.deadline_hours < KAGGLE_HOURS for v in plan.variants)


def _variant(**changes):
    values = dict(slug="mmml-v1", title="MMML v1", use_mean_prompt=False, deadline_hours=8.5,
                  models=[{"name": "m", "preset": "mistral-7b", "adapter": "mistral-7b-v3"}])
    values.update(changes)
    return Variant(**values)


@pytest.mark.parametrize("changes, message", [
    ({"slug": "MMML_v1", "title": "MMML_v1"}, r"^slug: 'MMML_v1' must be 5-50 characters"),
    ({"title": "Something else"}, r"^title: variant 'mmml-v1': title 'Something else' becomes 'something-else'"),
    ({"deadline_hours": 9.5}, r"^deadline_hours: variant 'mmml-v1': must be in \(0, 9\.0\) hours .*, got 9\.5$"),
    ({"deadline_hours": 0}, r"^deadline_hours: variant 'mmml-v1': must be in \(0, 9\.0\) hours .*, got 0$"),
    ({"models": []}, r"^models: variant 'mmml-v1': needs at least one model$"),
    ({"models": [{"name": "m", "preset": "gpt-5"}]},
     r"^variant 'mmml-v1' models\[0\] \(m\): preset: unknown preset 'gpt-5'"),
    ({"models": [{"name": "m", "preset": "mistral-7b", "n": 3, "temperature": 0}]},
     r"^variant 'mmml-v1' models\[0\] \(m\): n: n=3 with temperature 0 repeats one greedy answer"),
    ({"models": [{"name": "m", "preset": "mistral-22b"}]},  # no Kaggle model for this preset
     r"^variant 'mmml-v1' models\[0\] \(m\): base_model: preset 'mistral-22b' has no Kaggle model"),
    ({"models": [{"name": "m", "preset": "mistral-7b", "base_model": "mistral-ai/mistral"}]},
     r"^variant 'mmml-v1' models\[0\] \(m\): base_model: 'mistral-ai/mistral' is not a Kaggle model handle"),
    ({"models": [{"name": "m", "preset": "mistral-7b", "adapter": "owner/only"}]},
     r"^variant 'mmml-v1' models\[0\] \(m\): adapter: 'owner/only' must be a folder of the adapters dataset"),
    ({"models": [{"name": "m", "preset": "mistral-7b", "use_merged": True}]},
     r"^variant 'mmml-v1' models\[0\] \(m\): use_merged: use_merged needs an adapter"),
    ({"models": [{"name": "m", "preset": "mistral-7b"}, {"name": "m", "preset": "llama2-13b"}]},
     r"^models: variant 'mmml-v1': model names repeat: \['m', 'm'\]$"),
    ({"models": [{"name": "m", "preset": "mistral-7b", "size": 7}]},
     r"^variant 'mmml-v1' models\[0\]: unknown key\(s\) \['size'\]; the keys are \['name', 'preset', "),
    ({"params": {"test_file": "x.csv"}},
     r"^params: variant 'mmml-v1': \['test_file'\] are set by the plan's own fields$"),
    ({"engine": "tgi"}, r"^engine: variant 'mmml-v1': must be auto, vllm or hf, got 'tgi'$"),
])
def test_a_bad_variant_is_an_error_naming_the_field(changes, message):
    with pytest.raises(ConfigError, match=message):
        _variant(**changes)


def test_a_bad_plan_file_names_the_file(tmp_path):
    bad = tmp_path / "plan.yaml"
    bad.write_text("variants: []\nwheels: x\n")
    with pytest.raises(ConfigError,
                       match=rf"^{re.escape(str(bad))}: submission plan: unknown keys \['wheels'\]; known: "):
        load_plan(bad)


def test_an_older_plan_still_loads_and_says_the_new_names(tmp_path, caplog):
    """budget_hours (now deadline_hours), a model written with the notebook's old keys, and an old notebook parameter
    in a variant's params: each read under its new name, with a note naming it."""
    old = tmp_path / "plan.yaml"
    old.write_text("variants:\n"
                   "  - {slug: mmml-v1, title: MMML v1, budget_hours: 8.0, use_mean_prompt: false,\n"
                   "     params: {batch_size: 8},\n"
                   "     models: [{name: m, preset: mistral-7b, adapter_path: mistral-7b, base_model_path: '',\n"
                   "               merged_path: mistral-7b/merged, temperature: 0.7}]}\n")
    with caplog.at_level("WARNING", logger="kaggle_utils"):
        variant = load_plan(old).variants[0]
    assert variant.deadline_hours == 8.0 and variant.params == {"generation_batch_size": 8}
    assert variant.models == [ModelEntry(name="m", preset="mistral-7b", adapter="mistral-7b", use_merged=True,
                                         temperature=0.7)]
    for old_name, new_name in [("budget_hours", "deadline_hours"), ("batch_size", "generation_batch_size"),
                               ("adapter_path", "adapter"), ("base_model_path", "base_model"),
                               ("merged_path", "use_merged")]:
        assert f"'{old_name}' is now called '{new_name}'" in caplog.text
    old.write_text(old.read_text().replace("budget_hours: 8.0", "budget_hours: 8.0, deadline_hours: 8.0"))
    with pytest.raises(ConfigError, match=r"both 'budget_hours' and its new name 'deadline_hours' are set"):
        load_plan(old)
    with pytest.raises(ConfigError, match=r"merged_path: .* 'elsewhere/copy' is not <adapter>/merged"):
        ModelEntry.from_dict({"name": "m", "preset": "mistral-7b", "merged_path": "elsewhere/copy"}, "models[0]")


def test_older_local_settings_keys_still_load():
    settings = kernels.LocalSettings(paths={"/kaggle/working": "w"},
                                     model={"base_model_path": "", "adapter_path": "a", "merged_path": ""})
    assert settings.model == {"base_model": "", "adapter": "a", "use_merged": False}


@pytest.mark.parametrize("preset", [p for p in models.PRESETS.values() if p.kaggle_model_source])
def test_a_preset_kaggle_model_mounts_at_its_default_path(preset):
    assert kernels.model_path(preset.kaggle_model_source) == preset.default_path


def test_sources_resolve_the_user_and_other_owners():
    plan = load_plan()
    entry = ModelEntry(name="m", preset="mistral-7b", adapter="someone/their-adapters/mistral")
    assert kernels.adapter_ref(plan, entry, USER) == "someone/their-adapters/mistral"
    assert kernels.dataset_path("someone/their-adapters/mistral") == "/kaggle/input/their-adapters/mistral"
    v1 = plan.variant("mmml-v1")
    assert f"{USER}/mistral-22b-v0-2/transformers/default/1" in kernels.model_sources(v1, USER)
    assert kernels.dataset_sources(plan, v1, USER) == [
        f"{USER}/kaggle-utils-prompt-recovery", f"{USER}/prompt-recovery-wheels", f"{USER}/prompt-recovery-adapters"]
    with pytest.raises(ConfigError,
                       match=r"^variant: no variant 'nope' in the plan; planned: mistral-v3-x10, mmml-v1, "):
        plan.variant("nope")

def test_the_plan_says_which_run_makes_each_adapter_it_names():
    """Every adapter folder of the plan's own dataset has its make commands written in the plan file, so a user who
    trains the presets can push every variant without editing it."""
    plan = load_plan()
    text = (REPO / "configs" / "submissions.yaml").read_text()
    for v in plan.variants:
        for m in v.models:
            if m.adapter and "/" not in m.adapter:
                wanted = f"make {models.get_preset(m.preset).make_target} RUN={m.adapter}"
                assert wanted in text, f"{v.slug}: the plan does not say `{wanted}`"


def test_missing_adapter_folders_are_named_with_the_commands_that_make_them(tmp_path, caplog):
    plan = load_plan()
    runs = tmp_path / "runs"
    lines = kernels.missing_adapters(plan, "mmml-v2", runs_dir=runs)
    assert len(lines) == 4
    assert lines[0] == (f"{runs / 'mistral-7b' / 'selected'} (needed by mmml-v2): `make train-mistral RUN=mistral-7b`, "
                        "then `make select RUN=mistral-7b`")
    assert any("make train-mixtral RUN=mixtral-8x7b" in line for line in lines)
    for name in ("mistral-7b", "llama2-13b", "mistral-22b"):  # the files that make a folder an adapter
        (runs / name / "selected").mkdir(parents=True)
        (runs / name / "selected" / "adapter_config.json").write_text("{}")
        (runs / name / "selected" / "adapter_model.safetensors").write_bytes(b"")
    assert [line.split(" ")[0] for line in kernels.missing_adapters(plan, "mmml-v2", runs_dir=runs)] == [
        str(runs / "mixtral-8x7b" / "selected")]
    # the whole plan: a folder two variants read is named once, with both
    every = kernels.missing_adapters(plan, runs_dir=runs)
    assert sum("mixtral-8x7b/selected " in line for line in every) == 1
    assert any("(needed by mmml-v2, mmml-v2-with-mean-prompt)" in line for line in every)
    # make render renders anyway (no weights needed) and names what `make push-adapters` will lack
    kernels.render(plan, USER, out_dir=tmp_path / "kernels", slug="mmml-v2", runs_dir=runs)
    assert (tmp_path / "kernels" / "mmml-v2" / "kernel-metadata.json").exists()
    assert "make train-mixtral RUN=mixtral-8x7b" in caplog.text


# ---------------------------------------------------------------- rendered kernels


def test_render_writes_one_folder_per_variant_with_valid_metadata(plan, rendered):
    assert sorted(rendered) == sorted(SLUGS)
    for slug, folder in rendered.items():
        variant = plan.variant(slug)
        meta = json.loads((folder / "kernel-metadata.json").read_text())
        assert meta["id"] == f"{USER}/{slug}"
        assert meta["title"] == variant.title
        assert meta["code_file"] == "inference.ipynb" and (folder / meta["code_file"]).is_file()
        assert (meta["language"], meta["kernel_type"]) == ("python", "notebook")
        assert meta["is_private"] is True and meta["enable_gpu"] is True
        assert meta["enable_internet"] is False  # present and false, never left to the CLI's default
        assert meta["machine_shape"] == "NvidiaTeslaT4"
        assert meta["competition_sources"] == ["llm-prompt-recovery"]
        assert meta["dataset_sources"][:2] == [f"{USER}/kaggle-utils-prompt-recovery", f"{USER}/prompt-recovery-wheels"]
        assert f"{USER}/prompt-recovery-adapters" in meta["dataset_sources"]
        assert meta["model_sources"] == kernels.model_sources(variant, USER)
        assert all(len(s.split("/")) == 5 for s in meta["model_sources"])
        assert all(len(s.split("/")) == 2 for s in meta["dataset_sources"])


def test_rendered_notebooks_carry_the_parameters_and_read_only_attached_inputs(plan, rendered):
    for slug, folder in rendered.items():
        nb = nbformat.read(folder / "inference.ipynb", as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.outputs == [] and c.execution_count is None for c in code), slug
        install = nb.cells[0]
        assert install["id"] == kernels.INSTALL_CELL_ID
        assert "--no-index" in install.source and "--find-links" in install.source
        assert "/kaggle/input/kaggle-utils-prompt-recovery" in install.source
        assert "/kaggle/input/prompt-recovery-wheels" in install.source
        assert "git_commit()" in install.source and "__version__" in install.source
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1
        values = kernels.notebook_parameters(nb)
        expected = kernels.kernel_params(plan, plan.variant(slug))
        assert {k: values[k] for k in expected} == expected
        assert values["test_file"] == "/kaggle/input/llm-prompt-recovery/test.csv"
        assert values["submission_path"] == "/kaggle/working/submission.csv"
        meta = json.loads((folder / "kernel-metadata.json").read_text())
        assert kernels.foreign_paths(values, meta) == [], slug
        roots = kernels.mounted_roots(meta)
        for m in values["models"]:
            for key in ("base_model", "adapter"):
                assert any(m[key].startswith(r + "/") or m[key] == r for r in roots), (slug, m[key])
        assert str(REPO) not in json.dumps(nb), "a local path leaked into the kernel"


def test_the_install_cell_compiles_and_skips_itself_off_kaggle(plan, monkeypatch, capsys):
    source = kernels.install_cell_source(plan)
    exec(compile(source, "install", "exec"), {})  # KAGGLE_KERNEL_RUN_TYPE is unset here: it only reports
    assert "kaggle_utils 0.1.0, commit" in capsys.readouterr().out


def test_a_variants_params_reach_the_kernel(plan, tmp_path):
    """The docs' way to turn the merge at start off for one kernel: params in the variant."""
    plan.variants[0].params = {"merge_adapters": "off", "generation_batch_size": 32}
    folder = kernels.render_variant(plan, plan.variants[0], USER, tmp_path)
    values = kernels.notebook_parameters(nbformat.read(folder / kernels.CODE_FILE, as_version=4))
    assert values["merge_adapters"] == "off" and values["generation_batch_size"] == 32


def test_render_refuses_parameters_the_notebook_lacks_or_paths_outside_kaggle(plan, tmp_path):
    plan.variants[0].params = {"not_a_parameter": 1}
    with pytest.raises(ConfigError, match=r"^variant 'mistral-v3-x10': \['not_a_parameter'\] are not parameters of "):
        kernels.render_variant(plan, plan.variants[0], USER, tmp_path)
    plan.variants[0].params = {}
    plan.notebook = str(_write_notebook(tmp_path / "nb.ipynb", _real_parameters() + 'extra_file = "runs/x.csv"\n'))
    with pytest.raises(ConfigError,
                       match=r"^variant 'mistral-v3-x10': \['runs/x\.csv'\] lie outside the kernel's attached "):
        kernels.render_variant(plan, plan.variants[0], USER, tmp_path)
    assert not (tmp_path / plan.variants[0].slug).exists()


def test_rendering_again_replaces_the_folder(plan, tmp_path):
    folder = kernels.render_variant(plan, plan.variants[0], USER, tmp_path)
    (folder / "stale.txt").write_text("old")
    folder = kernels.render_variant(plan, plan.variants[0], "otheruser", tmp_path)
    assert not (folder / "stale.txt").exists()
    assert json.loads((folder / "kernel-metadata.json").read_text())["id"] == "otheruser/mistral-v3-x10"


# ---------------------------------------------------------------- the local mapping and the submission check


def test_localize_maps_kaggle_paths_and_replaces_models(tmp_path):
    plan = load_plan()
    settings = kernels.LocalSettings(
        paths={"/kaggle/input/llm-prompt-recovery/test.csv": str(tmp_path / "t.csv"),
               "/kaggle/working": str(tmp_path / "{slug}")},
        model={"preset": "smollm2-135m", "base_model": "", "adapter": str(tmp_path / "a")}, max_n=2)
    local = kernels.localize_params(kernels.kernel_params(plan, plan.variants[0]), settings, "s")
    assert local["test_file"] == str(tmp_path / "t.csv")
    assert local["submission_path"] == str(tmp_path / "s" / "submission.csv")
    assert local["models"][0]["preset"] == "smollm2-135m" and local["models"][0]["n"] == 2
    assert "/kaggle/" not in json.dumps(local)
    settings.model = {}
    with pytest.raises(ConfigError, match=r"^paths: no local folder for '/kaggle/input/mistral/pytorch/"):
        kernels.localize_params(kernels.kernel_params(plan, plan.variants[0]), settings, "s")


def test_the_default_local_settings_load():
    settings = kernels.load_local_settings()
    assert "/kaggle/working" in settings.paths and settings.model["preset"] == "smollm2-135m"


@pytest.mark.parametrize("rows, error", [
    ([("a", "Rewrite it."), ("b", "Make it formal.")], None),
    ([("a", "Rewrite it.")], r": ids differ from .*test\.csv's$"),
    ([("a", "Rewrite it."), ("b", " ")], r": 1 blank prompts \(Kaggle rejects them\)$"),
])
def test_check_submission(tmp_path, rows, error):
    pd.DataFrame({"id": ["a", "b"], "original_text": ["x", "y"], "rewritten_text": ["x", "y"]}).to_csv(
        tmp_path / "test.csv", index=False)
    pd.DataFrame(rows, columns=["id", "rewrite_prompt"]).to_csv(tmp_path / "sub.csv", index=False)
    if error:
        with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'sub.csv'))}{error}"):
            kernels.check_submission(tmp_path / "sub.csv", tmp_path / "test.csv")
    else:
        assert len(kernels.check_submission(tmp_path / "sub.csv", tmp_path / "test.csv")) == 2

# ---------------------------------------------------------------- the dry run


def _tiny_adapter(folder: Path) -> Path:
    """A real (untrained) rank-1 LoRA adapter on the embedded SmolLM2, as the selection stage would export it."""
    from peft import LoraConfig, get_peft_model

    model = models.load_model(models.get_preset("smollm2-135m"), models.prepare_default_model(), num_gpus=0)
    peft_model = get_peft_model(model, LoraConfig(r=1, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(folder)
    (folder / "selection.json").write_text(json.dumps({"step": 0, "preset": "smollm2-135m", "note": "test stand-in"}))
    return folder


def test_run_local_executes_the_rendered_kernel_with_local_paths(tmp_path):
    """The dry run's plumbing on a stand-in notebook that writes a submission at once (the real one: below)."""
    body = ("import os, pandas as pd\n"
            "rows = pd.read_csv(test_file)\n"
            "os.makedirs(os.path.dirname(submission_path), exist_ok=True)\n"
            "prompt = fallback_prompt + ' ' + models[0]['adapter'] + ' ' + str(models[0]['n'])\n"
            "pd.DataFrame({'id': rows['id'], 'rewrite_prompt': prompt}).to_csv(submission_path, index=False)")
    notebook = tmp_path / "nb.ipynb"
    _write_notebook(notebook, _real_parameters())
    nb = nbformat.read(notebook, as_version=4)
    nb.cells[-1].source = body
    nbformat.write(nb, notebook)
    pd.DataFrame({"id": ["a", "b"], "original_text": ["x", "y"], "rewritten_text": ["X", "Y"]}).to_csv(
        tmp_path / "test.csv", index=False)
    (tmp_path / "adapter").mkdir()
    plan = load_plan()
    plan.notebook = str(notebook)
    settings = kernels.LocalSettings(
        paths={"/kaggle/input/llm-prompt-recovery/test.csv": str(tmp_path / "test.csv"),
               "/kaggle/working": str(tmp_path / "{slug}")},
        model={"preset": "smollm2-135m", "base_model": "", "adapter": str(tmp_path / "adapter")}, max_n=2)
    path = kernels.run_local(plan, "mistral-v3-x10", settings, kernels_dir=tmp_path / "kernels", out_dir=tmp_path / "local")
    assert path == tmp_path / "mistral-v3-x10" / "submission.csv"
    sub = kernels.check_submission(path, tmp_path / "test.csv")
    assert set(sub["rewrite_prompt"]) == {f"Improve this text. {tmp_path / 'adapter'} 2"}
    executed = nbformat.read(tmp_path / "local" / "mistral-v3-x10" / "inference.ipynb", as_version=4)
    assert executed.cells[0]["id"] == kernels.INSTALL_CELL_ID
    assert "kaggle_utils 0.1.0, commit" in "".join(o.get("text", "") for o in executed.cells[0].outputs)


@pytest.mark.slow
def test_render_local_dry_run_writes_a_valid_submission(tmp_path):
    demo_adapter = REPO / "runs" / "demo" / "selected"
    adapter = demo_adapter if (demo_adapter / "adapter_config.json").exists() else _tiny_adapter(tmp_path / "adapter")
    test = pd.read_csv(GEMMA_CSV).head(6)
    test[["id", "original_text", "rewritten_text"]].to_csv(tmp_path / "test.csv", index=False)
    settings = kernels.LocalSettings(
        paths={"/kaggle/input/llm-prompt-recovery/test.csv": str(tmp_path / "test.csv"),
               "/kaggle/working": str(tmp_path / "{slug}" / "working")},
        model={"preset": "smollm2-135m", "base_model": "", "adapter": str(adapter), "use_merged": False},
        max_n=2, params={"max_new_tokens": 12})
    plan = load_plan()
    path = kernels.run_local(plan, "mistral-v3-x10", settings, kernels_dir=tmp_path / "kernels",
                             out_dir=tmp_path / "local")
    sub = kernels.check_submission(path, tmp_path / "test.csv")
    assert len(sub) == 6 and path == tmp_path / "mistral-v3-x10" / "working" / "submission.csv"
    executed = nbformat.read(tmp_path / "local" / "mistral-v3-x10" / "inference.ipynb", as_version=4)
    assert "kaggle_utils 0.1.0, commit" in "".join(o.get("text", "") for o in executed.cells[0].outputs)
