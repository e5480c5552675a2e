"""The Kaggle install of the GPU wheels can never cost the submission: a broken wheel, a vLLM that fails to import and
a vLLM that fails to start all end in the HF engine, logged, with the submission written.

Run: `pytest tests/test_wheels.py` (the rendered-kernel test builds a fresh venv, a few seconds).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from kaggle_utils import engines, inference, kaggle_api, kernels, serving, wheels
from kaggle_utils.plan import load_plan

REPO = Path(__file__).resolve().parents[1]


def fake_wheel(folder: Path, init: str, name: str = "vllm", version: str = "0.33.0") -> Path:
    """A real, installable pure-Python wheel whose ``__init__`` is ``init``."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": init,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for k, v in files.items():
            zf.writestr(k, v)
    return path


def wheels_dir(tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / f"wheels-{kind}"
    folder.mkdir()
    (folder / wheels.REQUIREMENTS).write_text("vllm==0.33.0\n")
    if kind == "broken":
        (folder / "vllm-0.33.0-py3-none-any.whl").write_bytes(b"not a zip archive")
    elif kind == "no-import":
        fake_wheel(folder, "raise ImportError('libcudart.so.13: cannot open shared object file')\n")
    return folder


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """setup_gpu_stack sets KAGGLE_UTILS_NO_VLLM in os.environ, as in a kernel; no test may leave it to the next.
    This machine has no GPU: the look at the card is off unless a test fakes nvidia-smi."""
    os.environ.pop(wheels.NO_VLLM_ENV, None)
    monkeypatch.setenv(wheels.CARD_CHECK_ENV, "0")
    yield
    os.environ.pop(wheels.NO_VLLM_ENV, None)


def fake_nvidia_smi(folder: Path, lines: list[str]) -> Path:
    """A stand-in ``nvidia-smi`` on PATH that answers the card query with ``lines`` (name, capability, driver)."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "nvidia-smi"
    tool.write_text("#!/bin/sh\n" + "".join(f"echo '{line}'\n" for line in lines))
    tool.chmod(0o755)
    return folder


@pytest.mark.parametrize("lines,problem", [
    (["Tesla T4, 7.5, 550.54.15", "Tesla T4, 7.5, 550.54.15"], ""),
    (["Tesla T4, 7.5, 470.82.01"], "driver 470.82.01 is older than 525, which the wheels' CUDA 12 needs"),
    (["Tesla P100-PCIE-16GB, 6.0, 550.54.15"],
     "Tesla P100-PCIE-16GB has compute capability 6.0; vLLM needs 7.0 or more"),
    ([], "no NVIDIA GPU visible (nvidia-smi lists none)"),
])
def test_the_card_is_read_without_cuda_and_ruled_out_when_vllm_cannot_run(tmp_path, monkeypatch, lines, problem):
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path / 'bin', lines)}{os.pathsep}{os.environ['PATH']}")
    card = wheels.read_card()
    assert wheels.card_problem(card) == problem
    if len(lines) == 2:
        assert card == {"gpus": 2, "name": "Tesla T4", "compute_capability": "7.5", "driver": "550.54.15"}
        assert wheels.gpu_path(card).startswith("2 x Tesla T4 (compute capability 7.5, driver 550.54.15): vLLM with "
                                                "fp16, Triton attention, eager mode")


def test_a_card_vllm_cannot_use_is_ruled_out_before_installing(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path / 'bin', ['Tesla T4, 7.5, 470.82.01'])}{os.pathsep}"
                               f"{os.environ['PATH']}")
    monkeypatch.setenv(wheels.CARD_CHECK_ENV, "1")
    report = wheels.setup_gpu_stack(wheels_dir(tmp_path, "no-import"), tmp_path / "site")
    assert not report.installed and not report.usable and report.card["driver"] == "470.82.01"
    assert report.why.startswith("driver 470.82.01 is older than 525")
    assert not (tmp_path / "site").exists()  # nothing was installed
    assert os.environ[wheels.NO_VLLM_ENV] == report.why and "GPU wheels not used (driver 470" in caplog.text


def test_a_broken_wheel_is_logged_and_vllm_ruled_out(tmp_path, caplog):
    report = wheels.setup_gpu_stack(wheels_dir(tmp_path, "broken"), tmp_path / "site")
    assert not report.installed and not report.usable
    assert "pip install failed" in report.why
    assert os.environ[wheels.NO_VLLM_ENV] == report.why
    assert "GPU wheels not used" in caplog.text
    assert str(tmp_path / "site") not in sys.path


def test_a_vllm_that_does_not_import_is_caught_in_a_child_process(tmp_path):
    report = wheels.setup_gpu_stack(wheels_dir(tmp_path, "no-import"), tmp_path / "site")
    assert report.installed and not report.usable
    assert report.why == "ImportError: libcudart.so.13: cannot open shared object file"
    assert (tmp_path / "site" / "vllm" / "__init__.py").exists()  # installed, but kept off this process's path
    loaded = sys.modules.get("vllm")  # other tests may import vLLM's real types; never the fake one
    assert str(tmp_path / "site") not in sys.path and str(tmp_path) not in str(getattr(loaded, "__file__", ""))


def test_no_wheels_dataset_is_a_reason_too(tmp_path):
    report = wheels.setup_gpu_stack(tmp_path / "not-attached", tmp_path / "site")
    assert not report.usable and "not attached" in report.why


def test_activate_puts_the_folder_first_for_this_process_and_its_children(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setenv(wheels.NO_VLLM_ENV, "earlier")
    wheels.activate(tmp_path)
    assert sys.path[0] == str(tmp_path)
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [str(tmp_path), "/elsewhere"]
    assert wheels.NO_VLLM_ENV not in os.environ


def test_the_engine_choice_honours_the_install_check(monkeypatch, caplog):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(serving, "vllm_import_error", lambda: "")
    assert serving.pick_engine("auto") == "vllm"
    monkeypatch.setenv(wheels.NO_VLLM_ENV, "pip install failed (exit 1): bad wheel")
    assert serving.pick_engine("auto") == "hf"
    assert serving.pick_engine("vllm") == "hf"  # asked for, but a submission is never lost to the engine choice
    assert "cannot run here (pip install failed" in caplog.text


def test_vllm_failing_at_start_falls_back_to_hf_and_the_submission_is_written(tmp_path, monkeypatch, caplog,
                                                                               tiny_model_dir):
    rows = pd.DataFrame({"id": [f"t{i}" for i in range(4)], "original_text": ["The cat sat on the mat."] * 4,
                         "rewritten_text": [f"A feline rested, version {i}." for i in range(4)]})
    test_file = tmp_path / "test.csv"
    rows.to_csv(test_file, index=False)
    cfg = inference.InferenceConfig(
        test_file=str(test_file), submission_path=str(tmp_path / "submission.csv"), run_dir=str(tmp_path / "run"),
        models=[{"name": "tiny", "preset": "mistral-7b", "base_model": str(tiny_model_dir("mistral")), "n": 2,
                 "temperature": 0.8, "top_p": 0.95}], engine="vllm", max_new_tokens=4)

    def no_start(*args, **kwargs):
        raise RuntimeError("1 validation error for VllmConfig\n  Value error, Total number of attention heads (9) must "
                           "be divisible by tensor parallel size (2).")

    monkeypatch.setattr(serving, "pick_engine", lambda requested, *model: "vllm")  # as on a GPU box where vLLM imports
    monkeypatch.setattr(engines.VLLMEngine, "from_preset", classmethod(no_start))
    from kaggle_utils import budget

    inference.prepare_run(cfg)
    test = inference.read_test(cfg)
    predictions, report = inference.sample_models(cfg, test, budget.Deadline.from_notebook_start(1))
    assert ("vLLM failed to start for tiny-mistral0 (RuntimeError: 1 validation error for VllmConfig | Value error, "
            "Total number of attention heads (9)") in caplog.text  # the reason below the first line reaches the log
    assert report["engine"].tolist() == ["hf"] and report["sampled"].tolist() == [4]
    path = inference.write_submission(cfg, inference.build_submission(cfg, test, predictions))
    assert inference.validate_submission(path, test)["rows"] == 4
    assert all(len(p) == 2 for p in predictions["tiny"].values())


def test_a_rendered_kernel_with_a_broken_wheel_still_reaches_its_notebook(tmp_path):
    """The rendered install cell itself, run as on Kaggle (KAGGLE_KERNEL_RUN_TYPE set) in a fresh Python: the
    library installs from its dataset, the broken GPU wheel is reported and vLLM is ruled out, the cell ends well."""
    plan = load_plan()
    folder = kernels.render_variant(plan, plan.variants[0], "fakeuser", tmp_path / "kernels")
    nb = json.loads((folder / "inference.ipynb").read_text())
    source = "".join(nb["cells"][0]["source"])
    library = kaggle_api.build_library_dataset("fakeuser", tmp_path / "library")
    broken = wheels_dir(tmp_path, "broken")
    source = (source.replace(f"{kernels.KAGGLE_INPUT}/{plan.library_dataset}", str(library))
              .replace(f"{kernels.KAGGLE_INPUT}/{plan.wheels_dataset}", str(broken))
              .replace(kernels.GPU_WHEELS_TARGET, str(tmp_path / "gpu-site")))
    source += f"\nprint('NO_VLLM=' + os.environ.get('{wheels.NO_VLLM_ENV}', ''))\n"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["KAGGLE_KERNEL_RUN_TYPE"] = "Batch"  # (the card check is off: this machine has no GPU)
    out = subprocess.run([str(venv / "bin" / "python"), "-c", source], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "kaggle_utils 0.1.0, commit" in out.stdout and "did not install" not in out.stdout
    summary = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("{")))
    assert summary["installed"] is False and summary["usable"] is False and "pip install failed" in summary["why"]
    assert "NO_VLLM=pip install failed" in out.stdout
    assert "GPU wheels not used" in out.stdout  # the reason reaches the kernel's log
    installed = subprocess.run([str(venv / "bin" / "python"), "-c", "import kaggle_utils, sys; print(kaggle_utils.__file__)"],
                               capture_output=True, text=True, env=env, cwd=tmp_path)
    assert str(venv) in installed.stdout  # the library came from its dataset's wheel, not from the checkout


def test_a_library_wheel_pip_refuses_is_imported_from_the_dataset_folder(tmp_path):
    """The rendered install cell when pip refuses the library's wheel (here: a wheel format pip does not know): the
    kernel says so and imports kaggle_utils from the wheel as a zip archive, and goes on."""
    plan = load_plan()
    folder = kernels.render_variant(plan, plan.variants[0], "fakeuser", tmp_path / "kernels")
    source = "".join(json.loads((folder / "inference.ipynb").read_text())["cells"][0]["source"])
    library = kaggle_api.build_library_dataset("fakeuser", tmp_path / "library")
    wheel = next(library.glob("*.whl"))
    with zipfile.ZipFile(wheel) as z:
        files = {n: z.read(n) for n in z.namelist()}
    info = next(n for n in files if n.endswith(".dist-info/WHEEL"))
    files[info] = files[info].replace(b"Wheel-Version: 1.0", b"Wheel-Version: 9.0")
    with zipfile.ZipFile(wheel, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    source = (source.replace(f"{kernels.KAGGLE_INPUT}/{plan.library_dataset}", str(library))
              .replace(f"{kernels.KAGGLE_INPUT}/{plan.wheels_dataset}", str(tmp_path / "no-wheels"))
              .replace(kernels.GPU_WHEELS_TARGET, str(tmp_path / "gpu-site")))
    source += ("\nprint('FROM=' + kaggle_utils.__file__)\n"
               "import subprocess\nchild = subprocess.run([sys.executable, '-c', 'import kaggle_utils.engines; "
               "print(kaggle_utils.__file__)'], capture_output=True, text=True)\n"
               "print('CHILD=' + child.stdout.strip())\n")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["KAGGLE_KERNEL_RUN_TYPE"] = "Batch"
    out = subprocess.run([str(venv / "bin" / "python"), "-c", source], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "kaggle_utils did not install (" in out.stdout and f"importing it from {wheel}" in out.stdout
    assert f"FROM={wheel}{os.sep}kaggle_utils{os.sep}__init__.py" in out.stdout
    # a child process (the GPU wheels' check imports kaggle_utils there) finds it the same way
    assert f"CHILD={wheel}{os.sep}kaggle_utils{os.sep}__init__.py" in out.stdout
    assert "kaggle_utils 0.1.0, commit" in out.stdout


def test_a_driver_too_old_to_know_compute_cap_is_still_ruled_out(tmp_path, monkeypatch):
    """nvidia-smi of an old driver refuses the compute_cap field: the name and the driver alone still tell."""
    folder = tmp_path / "bin"
    folder.mkdir()
    tool = folder / "nvidia-smi"
    tool.write_text('#!/bin/sh\ncase "$1" in *compute_cap*) echo "Field compute_cap is not a valid field" >&2; '
                    'exit 2;; esac\necho "Tesla T4, 470.82.01"\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    card = wheels.read_card()
    assert card == {"gpus": 1, "name": "Tesla T4", "compute_capability": "?", "driver": "470.82.01"}
    assert wheels.card_problem(card).startswith("driver 470.82.01 is older than 525")


@pytest.mark.parametrize("line, capability", [("NVIDIA A100-SXM4-40GB, 8.0, 550.54.15", (8, 0)),
                                              ("NVIDIA H100 80GB HBM3, 9.0, 550.54.15", (9, 0)),
                                              ("Tesla T4, 7.5, 550.54.15", (7, 5))])
def test_the_gpu_path_said_before_installing_is_the_one_vllm_takes(tmp_path, monkeypatch, line, capability):
    """From compute capability 8.0 on: bf16, vLLM's own attention backend and CUDA graphs; below it fp16, Triton
    attention and eager mode. What the log says is what engines.vllm_llm_kwargs then asks vLLM for on that card."""
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path / 'bin', [line])}{os.pathsep}{os.environ['PATH']}")
    card = wheels.read_card()
    assert card["compute_capability"] == f"{capability[0]}.{capability[1]}" and wheels.card_problem(card) == ""
    said = wheels.gpu_path(card)
    assert said.startswith(f"1 x {line.split(',')[0]} (compute capability {card['compute_capability']}, driver "
                           "550.54.15): vLLM with ")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 8, "num_key_value_heads": 8}))
    kwargs = engines.vllm_llm_kwargs(model, num_gpus=1, capability=capability)
    if capability >= (8, 0):
        assert "bf16, vLLM's own attention backend, CUDA graphs" in said
        assert kwargs["dtype"] == "bfloat16" and "attention_backend" not in kwargs and "enforce_eager" not in kwargs
    else:
        assert "fp16, Triton attention, eager mode" in said
        assert (kwargs["dtype"], kwargs["attention_backend"], kwargs["enforce_eager"]) == ("half", "TRITON_ATTN", True)


def test_an_nvidia_smi_that_hangs_is_given_up_on_and_counts_as_no_card(tmp_path, monkeypatch, caplog):
    """The driver query has a timeout: an nvidia-smi that never answers (a wedged driver) is killed after it, read as
    no card, and vLLM is ruled out before anything is installed; the kernel goes on."""
    import time

    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "nvidia-smi").write_text("#!/bin/sh\nexec sleep 120\n")
    (folder / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    began = time.monotonic()
    assert wheels.read_card(timeout=1) == {}
    assert time.monotonic() - began < 60  # killed at the timeout, not waited out
    monkeypatch.setenv(wheels.CARD_CHECK_ENV, "1")
    report = wheels.setup_gpu_stack(wheels_dir(tmp_path, "no-import"), tmp_path / "site", card_timeout=1)
    assert report.card == {} and report.why == "no NVIDIA GPU visible (nvidia-smi lists none)"
    assert not report.installed and not (tmp_path / "site").exists()
    assert os.environ[wheels.NO_VLLM_ENV] == report.why


def test_the_rendered_install_cell_looks_at_the_card_first(tmp_path):
    """The rendered install cell as on Kaggle, the card check on (as it is there) and nvidia-smi faked: on an H100 the
    log says vLLM's path for compute capability 9.0 and the wheels are installed (here a broken one: ruled out, the
    cell ends well); on a driver older than the wheels' CUDA nothing is installed at all."""
    plan = load_plan()
    folder = kernels.render_variant(plan, plan.variants[0], "fakeuser", tmp_path / "kernels")
    source = "".join(json.loads((folder / "inference.ipynb").read_text())["cells"][0]["source"])
    library = kaggle_api.build_library_dataset("fakeuser", tmp_path / "library")
    source = (source.replace(f"{kernels.KAGGLE_INPUT}/{plan.library_dataset}", str(library))
              .replace(f"{kernels.KAGGLE_INPUT}/{plan.wheels_dataset}", str(wheels_dir(tmp_path, "broken")))
              .replace(kernels.GPU_WHEELS_TARGET, str(tmp_path / "gpu-site")))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)

    def run_cell(card_line: str):
        smi = fake_nvidia_smi(tmp_path / card_line.split(",")[0].replace(" ", "_"), [card_line])
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", wheels.CARD_CHECK_ENV)}
        env.update(KAGGLE_KERNEL_RUN_TYPE="Batch", PATH=f"{smi}{os.pathsep}{os.environ['PATH']}")
        out = subprocess.run([str(venv / "bin" / "python"), "-c", source], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout, json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("{")))

    out, summary = run_cell("NVIDIA H100 80GB HBM3, 9.0, 550.54.15")
    assert summary["card"] == {"gpus": 1, "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                               "driver": "550.54.15"}
    assert ("GPU path: 1 x NVIDIA H100 80GB HBM3 (compute capability 9.0, driver 550.54.15): vLLM with bf16, vLLM's "
            "own attention backend, CUDA graphs") in out
    assert "pip install failed" in summary["why"] and not summary["usable"]  # looked at, then installed (and refused)
    out, summary = run_cell("Tesla T4, 7.5, 470.82.01")
    assert summary["why"].startswith("driver 470.82.01 is older than 525") and not summary["installed"]
    assert "GPU path" not in out and "GPU wheels not used (driver 470.82.01" in out
    assert not (tmp_path / "gpu-site").exists()
