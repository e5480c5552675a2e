"""The GPU stack inside a Kaggle kernel: the offline install of vLLM's wheels, a check that they run, the fallback.

A competition kernel has no internet, so vLLM and the torch it pins arrive as an attached dataset of wheels
(``make wheels``, ``make push-wheels``). That install must never cost the submission, so:

- the wheels go into a folder of their own (``pip install --target``), never over Kaggle's packages: a failed or
  half-finished install leaves Kaggle's torch and transformers exactly as they were;
- a child process checks them (``import vllm``, ``from vllm import LLM``, CUDA visible to the wheels' torch): a
  torch built for a newer CUDA than Kaggle's driver fails there, not in the kernel;
- only a stack that passed goes first on ``sys.path`` (and ``PYTHONPATH``, for vLLM's worker processes). Otherwise
  the reason is logged and put in ``KAGGLE_UTILS_NO_VLLM``, which :func:`kaggle_utils.serving.pick_engine` reads:
  the HF engine then runs on Kaggle's own torch.

Nothing here imports torch in the kernel's own process, and no failure here raises.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("kaggle_utils")

NO_VLLM_ENV = "KAGGLE_UTILS_NO_VLLM"  # set to the reason when the wheels' vLLM must not be used
CARD_CHECK_ENV = "KAGGLE_UTILS_CARD_CHECK"  # "0": skip the look at the GPUs before installing (tests, dry runs)
# The wheel set (requirements-kaggle.txt) is built for CUDA 12 (torch 2.10 cu128, vLLM 0.19.1 cu129): under NVIDIA's
# minor-version compatibility any CUDA 12 build runs on a driver of 525 or newer; CUDA 13 builds need 580.
MIN_DRIVER = 525
MIN_CAPABILITY = (7, 0)  # vLLM's oldest supported GPUs (Volta); a T4 is 7.5
DEFAULT_TARGET = "/tmp/gpu-wheels"  # scratch space, not part of the kernel's output
REQUIREMENTS = "requirements-kaggle.txt"  # beside the wheels (kaggle_api.write_wheels_metadata puts it there)

# Run by the checking child process, with the wheels' folder first on its path. The driver version comes from
# nvidia-smi when there is one, so a log shows it beside the CUDA version torch was built for.
_PROBE = r"""
import json, shutil, subprocess, sys
info = {}
try:
    import vllm
    from vllm import LLM  # noqa: F401  (the part that needs the compiled kernels and the right torch)
    import torch
    info.update(vllm=vllm.__version__, torch=torch.__version__, torch_cuda=torch.version.cuda)
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    if not torch.cuda.is_available():
        raise RuntimeError("the wheels' torch sees no CUDA device (a driver older than torch's CUDA "
                           f"{torch.version.cuda}?)")
    torch.zeros(1, device="cuda")  # CUDA itself, not only the device list: a too-old driver fails here
    info["gpus"] = torch.cuda.device_count()
    # What the kernel imports next, over the wheels (their numpy and transformers shadow the image's): a clash with
    # the image's pandas or peft must show here, not in the next cell, where nothing could fall back.
    import pandas, peft, accelerate, transformers, sentence_transformers  # noqa: E401,F401
    import kaggle_utils.inference, kaggle_utils.engines, kaggle_utils.metric  # noqa: E401,F401
    info["transformers"] = transformers.__version__
except BaseException as e:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()][:3]
    info["error"] = f"{type(e).__name__}: {' | '.join(lines)[:400]}"
print("PROBE " + json.dumps(info))
"""


@dataclass
class StackReport:
    """What became of the GPU wheels in this kernel."""

    wheels_dir: str  # the attached dataset of wheels
    target: str  # where they were installed
    installed: bool = False  # pip finished without error
    usable: bool = False  # the check passed and the folder is first on sys.path
    why: str = ""  # why not usable ("" when usable)
    seconds: float = 0.0  # install + check
    versions: dict = field(default_factory=dict)  # vllm, torch, torch_cuda, driver, gpus (what the check saw)
    card: dict = field(default_factory=dict)  # what nvidia-smi said before anything was installed


def _tail(text: str, lines: int = 3) -> str:
    """The last lines of a tool's output (pip puts its reason last)."""
    kept = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return " | ".join(kept[-lines:])


def read_card(timeout: float = 60) -> dict:
    """The GPUs as ``nvidia-smi`` lists them, without importing torch or CUDA: {gpus, name, compute_capability,
    driver}; {} when there is no nvidia-smi or it lists nothing."""
    import shutil

    if not shutil.which("nvidia-smi"):
        return {}
    # Drivers older than about 510 do not know compute_cap: then the name and the driver alone (which rule them out)
    for fields in ("name,compute_cap,driver_version", "name,driver_version"):
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError):
            return {}
        width = fields.count(",") + 1
        rows = [[x.strip() for x in line.split(",")] for line in out.stdout.splitlines()
                if out.returncode == 0 and line.count(",") == width - 1]
        if rows:
            name, *rest = rows[0]
            capability, driver = rest if width == 3 else ("?", rest[0])
            return {"gpus": len(rows), "name": name, "compute_capability": capability, "driver": driver}
    return {}


def card_problem(card: dict) -> str:
    """Why the wheels' vLLM cannot run on ``card`` (:func:`read_card`), or "" when it can, as far as a look tells."""
    if not card:
        return "no NVIDIA GPU visible (nvidia-smi lists none)"
    try:
        driver = int(card["driver"].split(".")[0])
    except (KeyError, ValueError):
        return ""  # an unexpected answer: let the install and the child-process check decide
    if driver < MIN_DRIVER:
        return f"driver {card['driver']} is older than {MIN_DRIVER}, which the wheels' CUDA 12 needs"
    try:
        major, minor = (int(x) for x in card["compute_capability"].split(".")[:2])
    except (KeyError, ValueError):
        return ""
    if (major, minor) < MIN_CAPABILITY:
        return (f"{card['name']} has compute capability {major}.{minor}; vLLM needs "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or more")
    return ""


def gpu_path(card: dict) -> str:
    """In words, what vLLM will do on ``card``: the settings ``engines.vllm_llm_kwargs`` chooses for it."""
    try:
        turing = int(card["compute_capability"].split(".")[0]) < 8
    except (KeyError, ValueError):
        turing = True
    how = ("fp16, Triton attention, eager mode (no FlashAttention or bf16 below compute capability 8.0)" if turing
           else "bf16, vLLM's own attention backend, CUDA graphs")
    return (f"{card['gpus']} x {card['name']} (compute capability {card['compute_capability']}, driver "
            f"{card['driver']}): vLLM with {how}, tensor parallel over the GPUs that split the model's heads")


def install(wheels_dir: str | os.PathLike, target: str | os.PathLike, requirements: str = REQUIREMENTS,
            timeout: float = 1800) -> tuple[bool, str]:
    """``pip install --no-index --target`` of the requirements file beside the wheels; (ok, why not)."""
    req = Path(wheels_dir) / requirements
    if not req.exists():
        return False, f"no {req}: the wheels dataset is not attached or was built without it"
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--disable-pip-version-check", "--no-warn-conflicts",
           "--find-links", str(wheels_dir), "--target", str(target), "--upgrade", "-r", str(req)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"pip install did not finish in {timeout:.0f} s"
    except OSError as e:
        return False, f"pip could not run: {e}"
    if out.returncode != 0:
        return False, f"pip install failed (exit {out.returncode}): {_tail(out.stderr or out.stdout)}"
    return True, ""


def probe(target: str | os.PathLike, timeout: float = 600) -> tuple[bool, str, dict]:
    """Import vLLM from ``target`` in a child process and check CUDA there; (ok, why not, versions seen)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH", "")) if p))
    env.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)  # the driver's own answer here (training sets the NVML check)
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return False, f"the check did not finish in {timeout:.0f} s", {}
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("PROBE ")), "")
    if not line:
        return False, f"the check crashed (exit {out.returncode}): {_tail(out.stderr)}", {}
    info = json.loads(line[len("PROBE "):])
    error = info.pop("error", "")
    return not error, error, info


def activate(target: str | os.PathLike) -> None:
    """Put ``target`` first on this process's path and on ``PYTHONPATH`` (vLLM's workers are new processes)."""
    target = str(target)
    if target not in sys.path:
        sys.path.insert(0, target)
    old = os.environ.get("PYTHONPATH", "")
    if target not in old.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (target, old) if p)
    os.environ.pop(NO_VLLM_ENV, None)


def setup_gpu_stack(wheels_dir: str | os.PathLike, target: str | os.PathLike = DEFAULT_TARGET,
                    requirements: str = REQUIREMENTS, install_timeout: float = 1800,
                    probe_timeout: float = 600, card_timeout: float = 60) -> StackReport:
    """Look at the GPUs, then install, check and (if it passed) activate the GPU wheels; never raises.

    A card vLLM cannot use (none, compute capability below 7.0, a driver older than the wheels' CUDA needs) is ruled
    out before the minutes of installing; otherwise the log says which path vLLM will take there. An ``nvidia-smi``
    that does not answer within ``card_timeout`` seconds counts as no card. The report says what happened; on any
    failure ``KAGGLE_UTILS_NO_VLLM`` holds the reason and the HF engine runs on Kaggle's own packages."""
    start = time.time()
    report = StackReport(wheels_dir=str(wheels_dir), target=str(target))
    try:
        if os.environ.get(CARD_CHECK_ENV, "1") != "0":  # nothing to install where vLLM cannot run
            report.card = read_card(card_timeout)
            report.why = card_problem(report.card)
            if not report.why:
                logger.info("GPU path: %s", gpu_path(report.card))
        if not report.why:
            report.installed, report.why = install(wheels_dir, target, requirements, install_timeout)
        if report.installed:
            report.usable, report.why, report.versions = probe(target, probe_timeout)
        if report.usable:
            activate(target)
    except Exception as e:  # anything unforeseen: still never the submission's end
        report.usable, report.why = False, f"{type(e).__name__}: {e}"
    report.seconds = round(time.time() - start, 1)
    if report.usable:
        logger.info("GPU wheels ready from %s (%s, %.0f s): vLLM can run", target, report.versions, report.seconds)
    else:
        os.environ[NO_VLLM_ENV] = report.why
        logger.warning("GPU wheels not used (%s); the HF engine runs on this image's own torch", report.why)
    return report


def summary(report: StackReport) -> str:
    """One line for the kernel's output."""
    return json.dumps(dataclasses.asdict(report))
