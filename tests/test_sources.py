"""`make data`: the builder against a local HTTP server serving small fixture files written here (no real rows).

    .venv/bin/python -m pytest -q tests/test_sources.py
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from kaggle_utils import config, data, sources

REPO = Path(__file__).resolve().parents[1]


def _csv(header: list[str], rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    pd.DataFrame(rows, columns=header).to_csv(buf, index=False)
    return buf.getvalue().encode()


# Fixtures with the upstream headers (shared/data/README.md); every text made up for the test.
FIXTURES = {
    "pedromb-gemma7b-eval": _csv(
        ["original_text", "rewritten_text", "rewrite_prompt_og", "rewrite_prompt", "score"],
        [["A cat sat.", "A feline rested.", "Make it formal.", "GUESS one", "0.5"],
         ["Rain fell.", "Drops of sky.", "Turn it into a poem.", "GUESS two", "0.7"],
         ["", "Empty original.", "Dropped row.", "GUESS", "0.1"],
         ["Rain fell.", "Drops of sky.", "Turn it into a poem.", "GUESS two", "0.7"]]),  # a repeat: its own id
    "getorca-gemma-filtered": _csv(
        ["original_text", "gt_rewrite_prompt", "rewritten_text", "rewrite_prompt", "score"],
        [["Hello there.", "Say it like a pirate.", "Ahoy there.", "guess", "0.9"]]),
    "getorca-gemini-dolly": _csv(
        ["", "id", "Unnamed: 0", "original_text", "gt_rewrite_prompt", "rewritten_text", "style", "rewrite_prompt",
         "score"],
        [["0", "7", "7", "The sun rose.", "Write it as a haiku.", "Sun climbs / morning", "haiku", "g", "0.8"],
         ["1", "8", "8", "Text.", "", "No prompt: dropped.", "x", "g", "0.1"]]),
    "alexsaavedraa-gpt35": _csv(
        ["idx", "score", "file", "rewrite_prompt", "id", "original_text", "category", "rewritten_text"],
        [["0", "1", "f.csv", "Make it sound sad.", "x1", "We won.", "tone", "We won, sadly."]]),
    "selected-prompts": json.dumps(["Rewrite this as a sea shanty.", "Make it formal."]).encode(),
}


def _fixture_files() -> list[sources.UpstreamFile]:
    """The real pins with each sha256 replaced by the fixture's (the builder checks whatever it is given)."""
    return [sources.UpstreamFile(**{**f.__dict__, "sha256": hashlib.sha256(FIXTURES[f.label]).hexdigest()})
            for f in sources.UPSTREAM]


class _Server:
    """Serves FIXTURES at /<repo>/<commit>/<path>, like raw.githubusercontent.com; counts requests."""

    def __init__(self, files, overrides=None):
        self.routes = {f"/{f.repo}/{f.commit}/{f.path}": FIXTURES[f.label] for f in files}
        self.routes.update(overrides or {})
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                body = server.routes.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server(_fixture_files())
    yield s
    s.close()


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens once the socket closes


def test_build_writes_the_three_files_in_our_columns_from_the_right_upstream_columns(server, tmp_path):
    written = sources.build_data(tmp_path / "data", base_url=server.url, files=_fixture_files())
    assert sorted(written) == sorted(sources.OUTPUTS)
    gemma = pd.read_csv(written["gemma_rewrites.csv"], dtype=str, keep_default_na=False)
    assert list(gemma.columns) == sources.COLUMNS
    # the true prompt is rewrite_prompt_og; upstream's rewrite_prompt (a guess) and score are gone
    assert gemma["rewrite_prompt"].tolist() == ["Make it formal.", "Turn it into a poem.", "Turn it into a poem."]
    assert set(gemma["source"]) == {"pedromb-gemma7b-eval"}
    assert gemma["id"].is_unique and all(i.startswith("g-") for i in gemma["id"])
    assert gemma["id"][2] == gemma["id"][1] + "-2"  # the repeated row keeps its own id
    extra = pd.read_csv(written["extra_rewrites.csv"], dtype=str, keep_default_na=False)
    assert extra["source"].tolist() == ["getorca-gemma-filtered", "getorca-gemini-dolly", "alexsaavedraa-gpt35"]
    assert extra["rewrite_prompt"].tolist() == ["Say it like a pirate.", "Write it as a haiku.", "Make it sound sad."]
    assert json.loads(written["selected_prompts.json"].read_text()) == ["Rewrite this as a sea shanty.",
                                                                         "Make it formal."]
    # the pipeline's own reader takes the result as it takes ../shared/data
    rows = data.load_training_rows([written["extra_rewrites.csv"], written["gemma_rewrites.csv"]], dedup=False)
    assert len(rows) == 6


def test_a_second_build_reuses_the_checked_downloads_and_gives_the_same_ids(server, tmp_path):
    first = pd.read_csv(sources.build_data(tmp_path / "d", base_url=server.url,
                                           files=_fixture_files())["gemma_rewrites.csv"])
    assert len(server.requests) == len(sources.UPSTREAM)
    second = pd.read_csv(sources.build_data(tmp_path / "d", base_url=server.url,
                                            files=_fixture_files())["gemma_rewrites.csv"])
    assert len(server.requests) == len(sources.UPSTREAM), "a checked download was fetched again"
    assert first["id"].tolist() == second["id"].tolist()


def test_a_file_that_is_not_the_pinned_one_is_refused_by_url_and_not_used(tmp_path):
    files = _fixture_files()
    gemma = files[0]
    tampered = FIXTURES[gemma.label].replace(b"Make it formal.", b"Make it FORMAL.")
    s = _Server(files, {f"/{gemma.repo}/{gemma.commit}/{gemma.path}": tampered})
    try:
        with pytest.raises(sources.SourceError) as e:
            sources.build_data(tmp_path / "d", base_url=s.url, files=files)
    finally:
        s.close()
    message = str(e.value)
    assert message.startswith("1 of 5 upstream file(s) are missing")
    assert f"{s.url}/{gemma.repo}/{gemma.commit}/{gemma.path}" in message
    assert f"not the pinned {gemma.sha256}" in message
    assert not (tmp_path / "d" / "gemma_rewrites.csv").exists()
    assert not (tmp_path / "d" / "upstream" / gemma.local_name).exists()
    assert (tmp_path / "d" / "upstream" / (gemma.local_name + ".bad")).read_bytes() == tampered


def test_without_a_network_each_url_and_its_local_path_are_named_and_hand_placed_files_are_used(tmp_path):
    files = _fixture_files()
    offline = _closed_port_url()
    with pytest.raises(sources.SourceError) as e:
        sources.build_data(tmp_path / "d", base_url=offline, files=files, timeout=5)
    message = str(e.value)
    assert message.startswith("5 of 5 upstream file(s) are missing; then run `make data` again")
    upstream = tmp_path / "d" / "upstream"
    for f in files:
        assert f.url(offline) in message and f"put the file at {upstream / f.local_name}" in message
    assert not (tmp_path / "d" / "gemma_rewrites.csv").exists()
    # the user puts each file where the message said; the next build needs no network
    for f in files:
        (upstream / f.local_name).write_bytes(FIXTURES[f.label])
    written = sources.build_data(tmp_path / "d", base_url=offline, files=files, timeout=5)
    assert len(pd.read_csv(written["extra_rewrites.csv"])) == 3


def test_the_script_exits_2_with_the_urls_when_offline(tmp_path):
    offline = _closed_port_url()
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "build_data.py"), "--out", str(tmp_path / "d"),
                          "--base-url", offline, "--timeout", "5"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("error: 5 of 5 upstream file(s) are missing")
    assert all(f.url(offline) in out.stderr for f in sources.UPSTREAM)
    assert "Traceback" not in out.stderr


def test_pins_match_the_documented_sources():
    """Each upstream file's label, short commit and path is the one docs/data.md names (the real folder's own
    README, where there is one, is checked against the full pins in tests/test_real_data.py)."""
    by_label = {f.label: f for f in sources.UPSTREAM}
    assert by_label["pedromb-gemma7b-eval"].prompt_column == "rewrite_prompt_og"
    assert {f.output for f in sources.UPSTREAM} == set(sources.OUTPUTS)
    text = (REPO / "docs" / "data.md").read_text()
    for f in sources.UPSTREAM:
        assert f.commit[:7] in text and f.path in text, f.label


# ---------------------------------------------------------------- where data/... points


def test_data_paths_read_shared_data_when_it_exists_else_the_built_folder(tmp_path, monkeypatch):
    checkout = tmp_path / "main"
    (checkout / "notebooks").mkdir(parents=True)
    (checkout / "Makefile").write_text("")
    monkeypatch.setenv("KAGGLE_UTILS_ROOT", str(checkout))
    monkeypatch.delenv("KAGGLE_UTILS_DATA", raising=False)
    assert config.resolve_path("data/gemma_rewrites.csv") == checkout / "data" / "gemma_rewrites.csv"
    assert config.resolve_path("runs/x") == checkout / "runs" / "x"
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert config.resolve_path("data/gemma_rewrites.csv") == tmp_path / "shared" / "data" / "gemma_rewrites.csv"
    monkeypatch.setenv("KAGGLE_UTILS_DATA", str(tmp_path / "mine"))
    assert config.resolve_path("data/x.csv") == tmp_path / "mine" / "x.csv"
    assert config.resolve_path("notdata/x.csv") == checkout / "notdata" / "x.csv"


def test_the_builder_never_writes_into_the_shared_folder(tmp_path, monkeypatch, server):
    checkout = tmp_path / "main"
    (checkout / "notebooks").mkdir(parents=True)
    (checkout / "Makefile").write_text("")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.setenv("KAGGLE_UTILS_ROOT", str(checkout))
    written = sources.build_data("data", base_url=server.url, files=_fixture_files())
    assert written["gemma_rewrites.csv"] == checkout / "data" / "gemma_rewrites.csv"
    assert not any((tmp_path / "shared" / "data").iterdir())


@pytest.mark.parametrize("shared", [True, False])
def test_make_demo_builds_the_data_first_only_where_there_is_none(tmp_path, shared):
    checkout = tmp_path / "main"
    checkout.mkdir()
    shutil.copy(REPO / "Makefile", checkout / "Makefile")
    stamp_rule = next(line for line in (REPO / "Makefile").read_text().splitlines() if line.startswith("$(STAMP):"))
    for name in stamp_rule.split(":", 1)[1].split():  # what the install stamp depends on; -n runs nothing
        (checkout / name).parent.mkdir(exist_ok=True)
        (checkout / name).write_text("")
    if shared:
        (tmp_path / "shared" / "data").mkdir(parents=True)
        (tmp_path / "shared" / "data" / "gemma_rewrites.csv").write_text("x\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "KAGGLE_UTILS_DATA"}
    out = subprocess.run(["make", "-n", "demo-train"], cwd=checkout, capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert ("scripts/build_data.py" in out.stdout) is (not shared)
