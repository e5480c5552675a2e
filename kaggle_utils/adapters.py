"""LoRA adapters: the checks that run before any model loads, applying one to a loaded model, and folding one into
a 16-bit copy of its base on disk.

Every stage that touches an adapter folder comes here: the engines attach one (:func:`attach_adapter`), the select
stage swaps one in per checkpoint (:func:`swap_adapter`) and writes ``selected/merged/``, serving merges one at kernel
start for vLLM (:func:`merge_adapter`, whose copy needs no LoRA kernels), and the inference stage checks the plan's
folders (:func:`selected_adapter`).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from pathlib import Path

from . import artifacts, models
from .config import resolve_path

logger = logging.getLogger("kaggle_utils")

MERGE_MARKER = "merge.json"  # in a merged folder: which base and adapter it holds (a later run reuses it)
_SWAPS = itertools.count()  # names of the adapters swap_adapter loads


# ---------------------------------------------------------------- checks


class AdapterError(ValueError):
    """An adapter folder is missing, incomplete, or was trained on another base model."""


def _selection(path: Path) -> artifacts.Selection | None:
    """The adapter folder's ``selection.json``, if any; an unreadable one is an :class:`AdapterError` naming it."""
    try:
        return artifacts.Selection.find(path)
    except artifacts.ArtifactError as e:
        raise AdapterError(f"adapter '{path}': {e}") from None


def check_adapter(adapter_path: str, preset: str = "") -> Path:
    """The adapter folder, checked for ``adapter_config.json`` and weights.

    When the folder holds a ``selection.json`` (written by checkpoint selection) and ``preset`` is given, the
    preset it was trained on must be ``preset``: an adapter of another base model is refused before anything loads.
    """
    path = resolve_path(adapter_path)
    if not path.is_dir():
        raise AdapterError(f"adapter path '{path}' does not exist (for the demo's adapter run `make demo` first)")
    if not artifacts.has_adapter(path):
        raise AdapterError(f"adapter path '{path}' has no adapter_config.json + adapter_model.safetensors")
    selection = _selection(path) if preset else None
    if selection is not None and selection.preset and selection.preset != preset:
        raise AdapterError(f"adapter '{path}' was trained on preset '{selection.preset}' "
                           f"({artifacts.SELECTION_FILE}), but the model entry uses preset '{preset}'")
    return path


def selected_adapter(adapter_path: str, preset: str = "") -> str:
    """The adapter folder to apply, checked (see :func:`check_adapter`); "" for none.

    Checkpoint selection exports no adapter when the base model (step 0) scored best: its ``selection.json`` then
    says ``"adapter": null``, and the base model runs as it is (logged), rather than failing the submission.
    """
    if not adapter_path:
        return ""
    path = resolve_path(adapter_path)
    if path.is_dir() and not (path / artifacts.ADAPTER_FILES[0]).exists():
        selection = _selection(path)
        if selection is not None and selection.adapter is None and selection.base_model_won:
            if preset and selection.preset and selection.preset != preset:
                raise AdapterError(f"selection '{path}' was made on preset '{selection.preset}', but the model "
                                   f"entry uses preset '{preset}'")
            logger.warning("%s: the base model won checkpoint selection (no adapter exported); running it without "
                           "an adapter", path)
            return ""
    return str(check_adapter(adapter_path, preset))


def adapter_rank(adapter_path: str) -> int:
    """The LoRA rank ``r`` in the adapter's ``adapter_config.json``."""
    cfg = json.loads((check_adapter(adapter_path) / "adapter_config.json").read_text())
    return int(cfg.get("r") or 1)


def check_adapter_fits(adapter_path: str, base_path: str | os.PathLike) -> None:
    """Compare the adapter's LoRA shapes with the base model's ``config.json`` without loading either model.

    Every projection that reads the residual stream (q/k/v/gate/up) has ``lora_A`` of shape (r, hidden_size); a
    mismatch means the adapter belongs to another base model, which is a clear error before minutes of loading.
    """
    path = check_adapter(adapter_path)
    weights = path / "adapter_model.safetensors"
    base_cfg = Path(base_path) / "config.json"
    if not weights.exists() or not base_cfg.exists():
        return  # a .bin adapter or a folder without config: attach_adapter still reports a mismatch
    from safetensors import safe_open

    hidden = json.loads(base_cfg.read_text()).get("hidden_size")
    if not hidden:
        return
    with safe_open(str(weights), framework="np") as fh:
        for key in fh.keys():
            module = key.split(".lora_A")[0].rsplit(".", 1)[-1] if ".lora_A" in key else ""
            if module in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                width = fh.get_slice(key).get_shape()[-1]
                if width != hidden:
                    raise AdapterError(
                        f"adapter '{path}' does not fit base model '{base_path}': {key} reads {width} features, "
                        f"the base model's hidden_size is {hidden} (adapter trained on another base model?)")


def attach_adapter(model, adapter_path: str, merge: bool = True):
    """Apply a LoRA adapter to a loaded base model; a shape mismatch (other base model) is a clear error."""
    from peft import PeftModel

    path = check_adapter(adapter_path)
    try:
        model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        base = getattr(model.config, "_name_or_path", "?")
        raise AdapterError(f"adapter '{path}' does not fit base model '{base}': {str(e).splitlines()[0][:300]}") from e
    if merge:
        model = model.merge_and_unload()
    return model


def swap_adapter(model, adapter_path: str | os.PathLike):
    """``model`` serving the adapter in ``adapter_path`` unmerged, in place of the one it served before: the first call
    wraps the base model, later calls load the new adapter and drop the old one (one in memory at a time). The select
    stage scores one loaded base at every checkpoint this way; a shape mismatch is a clear error."""
    from peft import PeftModel

    path = Path(adapter_path)
    name = f"swapped-{next(_SWAPS)}"  # never the name of the adapter it replaces, even for the same folder
    try:
        if not isinstance(model, PeftModel):
            return PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=False).eval()
        old = model.active_adapter
        model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        model.set_adapter(name)
        model.delete_adapter(old)
        return model
    except (RuntimeError, ValueError, KeyError) as e:
        raise AdapterError(f"{path} does not fit the base model: {str(e).splitlines()[0][:300]}") from e


# ---------------------------------------------------------------- the merged copy on disk


def merge_key(preset: str, base_model_path: str, adapter_path: str) -> dict:
    """What identifies a merge, as ``merge.json`` records it: the base folder, and the adapter with its weights'
    sha256 (the one key of a merged copy: it names the copy's folder too, :func:`merged_copy_folder`)."""
    from .sources import sha256_of  # here: sources loads pandas, which importing the engines must not

    base = models.resolve_base_path(models.get_preset(preset), base_model_path)
    adapter = check_adapter(adapter_path, preset)
    weights = adapter / artifacts.ADAPTER_FILES[1]
    if not weights.exists():
        weights = adapter / "adapter_model.bin"  # an older adapter's weights
    return {"base": str(base), "adapter": str(adapter), "adapter_sha256": sha256_of(weights)}


def merged_copy_folder(merge_dir: str | os.PathLike, preset: str, key: dict) -> Path:
    """The folder in ``merge_dir`` for the merge ``key`` (:func:`merge_key`): plan entries that share a base and an
    adapter (another n or temperature) share it, and an adapter whose weights changed gets a folder of its own."""
    tag = hashlib.sha256(f"{key['base']}|{key['adapter_sha256']}".encode()).hexdigest()[:12]
    return Path(merge_dir) / f"{preset}-{tag}"


def holds_merge(out: str | os.PathLike, key: dict) -> bool:
    """Whether ``out`` is a finished merge ``key`` describes: its ``merge.json`` (written last) records the same base
    and adapter weights."""
    try:
        held = json.loads((Path(out) / MERGE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return held.get("adapter_sha256") == key["adapter_sha256"] and held.get("base") == key["base"]


def merge_adapter(preset: str, base_model_path: str, adapter_path: str, out: str | os.PathLike,
                  key: dict | None = None) -> Path:
    """Fold the adapter into a 16-bit copy of the base and save it, with the tokenizer, as a model folder at ``out``.

    The base loads unquantized (merging into 4-bit weights would requantize them), on the GPUs when there are any
    (fp16; layers spread over every card), else on CPU in fp32 (CPU half-precision matmuls are slow and lose
    precision in the merge) and saved as fp16. The folder is written under a ``.partial`` name and renamed when
    complete, with ``merge.json`` naming its base and adapter: a folder that already holds this merge is reused.
    ``key`` is the merge's :func:`merge_key` when the caller has it (the adapter's weights are hashed once).
    """
    import torch
    from peft import PeftModel

    spec = models.get_preset(preset)
    base = models.resolve_base_path(spec, base_model_path)
    adapter = check_adapter(adapter_path, preset)
    out = Path(out)
    key = key or merge_key(preset, base_model_path, adapter_path)
    if holds_merge(out, key):
        logger.info("merge: %s already holds %s merged into %s; reused", out, adapter, base.name)
        return out
    start = time.time()
    tmp = out.with_name(out.name + ".partial")
    model = None
    try:
        tokenizer, resized = models.load_chat_tokenizer(base, spec.family)
        on_gpu = models.gpu_count() > 0
        model = models.load_model(spec, base, load_in_4bit=False, dtype=torch.float16 if on_gpu else torch.float32)
        if resized:
            model.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False).merge_and_unload()
        model = model.to(torch.float16)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MERGE_MARKER).write_text(json.dumps({**key, "seconds": round(time.time() - start, 1)}, indent=2)
                                        + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # a half-written merged folder never looks complete
    finally:  # also on failure: the weights leave the GPUs and a half-written copy leaves the disk
        del model
        shutil.rmtree(tmp, ignore_errors=True)
        models.free_gpu_memory()
    logger.info("merge: %s merged into %s -> %s (fp16) in %.0f s", adapter, base.name, out, time.time() - start)
    return out
