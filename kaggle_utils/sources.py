"""The training data's public sources: pinned upstream files, their checksums, and the builder behind `make data`.

`make data` downloads each upstream file at a pinned commit, checks its sha256, and writes the same files the
pipeline reads everywhere else into ``data/`` (gitignored):

- ``gemma_rewrites.csv``: rows rewritten by Gemma-7b-it, the competition's own rewriter (validation and selection);
- ``extra_rewrites.csv``: rows of three other public sets (Gemma filtered, Gemini, gpt-3.5), for training;
- ``selected_prompts.json``: a list of prompts resembling the hidden test set, the mean prompt's target.

Every CSV has the columns ``id, original_text, rewritten_text, rewrite_prompt, source``. Rows with an empty text or
prompt are dropped; each row's ``id`` is its source's tag and a hash of its three texts, so it is the same in every
build. Downloads are kept in ``data/upstream/`` and checked again before each build: a file already there is not
fetched twice, and one placed there by hand (no network) is used as is.

Nothing else in the bundle downloads at run time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .config import DATA_DIR, project_root

logger = logging.getLogger("kaggle_utils")

GITHUB_RAW = "https://raw.githubusercontent.com"
UPSTREAM_DIR = "upstream"  # inside the data folder: the downloads, checked by sha256 before every build
COLUMNS = ["id", "original_text", "rewritten_text", "rewrite_prompt", "source"]


class SourceError(RuntimeError):
    """An upstream file is missing, unreachable or not the pinned one; the message names each URL and local path."""


@dataclass(frozen=True)
class UpstreamFile:
    """One pinned file of a public repository and how its rows become ours."""

    label: str  # our `source` label (or the output's name, for the prompt list)
    repo: str  # GitHub owner/name
    commit: str  # the pinned commit
    path: str  # the file's path in the repository
    sha256: str  # of the exact bytes at that commit
    output: str  # the file of the data folder its rows go to
    prompt_column: str = "rewrite_prompt"  # the upstream column holding the true prompt
    tag: str = ""  # the id prefix of its rows

    def url(self, base: str = GITHUB_RAW) -> str:
        """Where the file is downloaded from (``base`` replaced in tests by a local server)."""
        return f"{base.rstrip('/')}/{self.repo}/{self.commit}/{self.path}"

    @property
    def local_name(self) -> str:
        """The download's name in ``data/upstream/``: unique per repository and path."""
        return f"{self.repo.replace('/', '__')}__{Path(self.path).name}"


# The pinned sources (the rows are competitors' public data; no licence ships with these repositories).
UPSTREAM = [
    UpstreamFile("pedromb-gemma7b-eval", "pedromb/llm-prompt-recovery", "ce2d539fece7003d35379949611b5f1ca2bf126c",
                 "data/eval_mistral_zero_shot.csv",
                 "8c262effee2b3f10e602053f4f428214c9e004890676723e6758686f43518ea8", "gemma_rewrites.csv",
                 prompt_column="rewrite_prompt_og", tag="g"),  # upstream rewrite_prompt is a Mistral zero-shot guess
    UpstreamFile("getorca-gemma-filtered", "getorca/llm_prompt_recovery", "79e5b72dfa7b0bc1154cef41b83ed9b562f31aed",
                 "data/predictions/combined-filtered_2.csv",
                 "bc85b7d193c73660fc66a9964e27d87cced43bf2c0ff194b1ceb5445141c0977", "extra_rewrites.csv",
                 prompt_column="gt_rewrite_prompt", tag="f"),
    UpstreamFile("getorca-gemini-dolly", "getorca/llm_prompt_recovery", "79e5b72dfa7b0bc1154cef41b83ed9b562f31aed",
                 "data/predictions/dolly_gemini_with_prompt_11.csv",
                 "e50c8fbc2dfc27b15ab6afb109b3aefa9e0937b9ed64cfcc64e939d88d1e5244", "extra_rewrites.csv",
                 prompt_column="gt_rewrite_prompt", tag="d"),
    UpstreamFile("alexsaavedraa-gpt35", "alexsaavedraa/Prompt-Recovery-Challenge",
                 "53fc94362ef5e2f399601a99b46b9947fc4d52a2", "clustering/source_data/triplicates_v15.csv",
                 "3e8bffe4e3c3dd7dfa90634b7dd12510a6cb2483a598f638a9198eca92316714", "extra_rewrites.csv",
                 tag="a"),
    UpstreamFile("selected-prompts", "pedromb/llm-prompt-recovery", "8b5bf5b0b8dd28a2775c29178967f2d4851b04e3",
                 "data/selected_prompts/prompts_selected.json",
                 "7e0951613ece787e74d3d9cdf4c39294f4ca336861e8ab7dcc5a28f2584306d0", "selected_prompts.json"),
]
OUTPUTS = ("gemma_rewrites.csv", "extra_rewrites.csv", "selected_prompts.json")


# ---------------------------------------------------------------- downloads


def _folder(data_dir: str | os.PathLike) -> Path:
    """The folder the builder writes: ``data_dir`` as given, relative to the checkout. Never the read-only
    ``../shared/data`` that ``data/...`` paths are read from where it exists."""
    p = Path(data_dir).expanduser()
    return p if p.is_absolute() else project_root() / p


def sha256_of(path: Path) -> str:
    """The file's sha256, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, dest: Path, timeout: float) -> None:
    """``url`` to ``dest`` with a progress bar; written to a partial file first, so a broken download leaves
    nothing that looks finished."""
    from tqdm.auto import tqdm

    part = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
            for block in iter(lambda: response.read(1 << 16), b""):
                out.write(block)
                bar.update(len(block))
    part.replace(dest)


def fetch_upstream(files=UPSTREAM, data_dir: str | os.PathLike = DATA_DIR, base_url: str = GITHUB_RAW,
                   timeout: float = 60.0) -> dict[str, Path]:
    """Every upstream file, checked by sha256, in ``data_dir/upstream/`` -> {label: path}.

    A file already there with the right checksum is kept; otherwise it is downloaded. Every file is tried before
    failing, and the error lists each one that could not be had: its URL, why, and the path to put it at by hand.
    """
    folder = _folder(data_dir) / UPSTREAM_DIR
    folder.mkdir(parents=True, exist_ok=True)
    found, problems = {}, []
    for f in files:
        dest = folder / f.local_name
        url = f.url(base_url)
        if dest.exists() and sha256_of(dest) == f.sha256:
            logger.info("%s: already downloaded (sha256 ok)", dest.name)
            found[f.label] = dest
            continue
        try:
            _download(url, dest, timeout)
        except (OSError, ValueError) as e:  # URLError is an OSError
            problems.append(f"{url}\n    could not be downloaded ({getattr(e, 'reason', e)});\n"
                            f"    put the file at {dest}")
            continue
        got = sha256_of(dest)
        if got != f.sha256:
            bad = dest.with_name(dest.name + ".bad")
            dest.replace(bad)
            problems.append(f"{url}\n    has sha256 {got}, not the pinned {f.sha256} (kept as {bad});\n"
                            f"    put the file of commit {f.commit} at {dest}")
            continue
        logger.info("%s: downloaded, sha256 ok", dest.name)
        found[f.label] = dest
    if problems:
        raise SourceError(f"{len(problems)} of {len(files)} upstream file(s) are missing; then run `make data` "
                          "again:\n  " + "\n  ".join(problems))
    return found


# ---------------------------------------------------------------- rows


def _row_ids(df: pd.DataFrame, tag: str) -> list[str]:
    """``<tag>-<12 hex of the three texts' sha1>``; a repeat of the same three texts gets ``-2``, ``-3``..."""
    seen: dict[str, int] = {}
    ids = []
    for o, r, p in zip(df["original_text"], df["rewritten_text"], df["rewrite_prompt"]):
        texts = "\x1f".join((o, r, p))
        key = f"{tag}-{hashlib.sha1(texts.encode()).hexdigest()[:12]}"
        seen[key] = seen.get(key, 0) + 1
        ids.append(key if seen[key] == 1 else f"{key}-{seen[key]}")
    return ids


def upstream_rows(f: UpstreamFile, path: Path) -> pd.DataFrame:
    """One upstream CSV as our columns: the true prompt renamed, other columns dropped, empty rows dropped."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    need = ["original_text", "rewritten_text", f.prompt_column]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise SourceError(f"{path} ({f.url()}): missing column(s) {missing}; found {list(df.columns)}")
    out = df[need].rename(columns={f.prompt_column: "rewrite_prompt"})
    out = out.apply(lambda col: col.str.strip())
    empty = out.eq("").any(axis=1)
    if empty.any():
        logger.info("%s: dropped %d row(s) with an empty text or prompt", f.label, int(empty.sum()))
    out = out.loc[~empty].reset_index(drop=True)
    out.insert(0, "id", _row_ids(out, f.tag))
    out["source"] = f.label
    return out[COLUMNS]


def build_data(data_dir: str | os.PathLike = DATA_DIR, base_url: str = GITHUB_RAW, files=UPSTREAM,
               timeout: float = 60.0) -> dict[str, Path]:
    """Fetch (or reuse) every upstream file, then write the data folder's CSVs and prompt list -> {name: path}."""
    folder = _folder(data_dir)
    paths = fetch_upstream(files, folder, base_url, timeout)
    written = {}
    for output in dict.fromkeys(f.output for f in files):
        parts = [f for f in files if f.output == output]
        dest = folder / output
        if output.endswith(".json"):
            prompts = json.loads(paths[parts[0].label].read_text())
            if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
                raise SourceError(f"{paths[parts[0].label]}: expected a JSON list of prompt strings")
            dest.write_text(json.dumps(prompts, ensure_ascii=False) + "\n")
            logger.info("%s: %d prompts", output, len(prompts))
        else:
            rows = pd.concat([upstream_rows(f, paths[f.label]) for f in parts], ignore_index=True)
            rows.to_csv(dest, index=False)
            counts = ", ".join(f"{s} {n}" for s, n in rows["source"].value_counts(sort=False).items())
            logger.info("%s: %d rows (%s)", output, len(rows), counts)
        written[output] = dest
    return written
