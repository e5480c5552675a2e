"""Kaggle delivery's side that talks to Kaggle: credentials, the datasets, and the real kaggle CLI against a stand-in
server (kernel push, dataset create and version, submit, status, and `make push` end to end).

Run: `.venv/bin/python -m pytest -q tests/test_kaggle_api.py`.

No test reaches the internet or a real account. Each test gets an empty HOME and no KAGGLE_* variables; the CLI tests
point the real kaggle CLI at a stand-in HTTP server bound to 127.0.0.1: KAGGLE_API_ENVIRONMENT=LOCALHOST makes the CLI
call http://localhost/api/v1/..., and HTTP(S)_PROXY routes every request (https included) to the stand-in.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nbformat
import pytest

from kaggle_utils import kaggle_api, kernels
from kaggle_utils.config import ConfigError
from kaggle_utils.plan import load_plan
from test_kernels import REAL_NOTEBOOK, REPO, SLUGS, USER, no_kaggle_account, plan, rendered  # noqa: F401

KEY = "fake-key-0123"


# ---------------------------------------------------------------- credentials


def test_no_credentials_is_a_clear_error(no_kaggle_account):
    assert kaggle_api.find_credentials() is None
    with pytest.raises(kaggle_api.CredentialsError, match=r"^`make push` needs Kaggle credentials and found none, so "
                                                          r"nothing was written\. .*~/\.kaggle/kaggle\.json.*"
                                                          r"KAGGLE_USERNAME and KAGGLE_KEY"):
        kaggle_api.require_credentials("`make push`")
    assert kaggle_api.resolve_user() == kernels.PLACEHOLDER_USER
    with pytest.raises(kaggle_api.CredentialsError, match=r"^no Kaggle user name: set `user:` in the plan or export "
                                                          r"KAGGLE_USERNAME$"):
        kaggle_api.resolve_user(required=True)


def test_credentials_from_the_environment_or_kaggle_json(no_kaggle_account, monkeypatch):
    (no_kaggle_account / ".kaggle").mkdir()
    (no_kaggle_account / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "jsonuser", "key": KEY}))
    creds = kaggle_api.find_credentials()
    assert creds.username == "jsonuser" and KEY not in repr(creds)
    assert kaggle_api.resolve_user() == "jsonuser"
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    assert kaggle_api.find_credentials().username == USER
    assert kaggle_api.resolve_user() == USER


# ---------------------------------------------------------------- datasets


def _fake_adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 1, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(b"not real weights")
    (folder / "selection.json").write_text(json.dumps({"step": 200}))
    return folder


def test_library_dataset_holds_a_wheel_stamped_with_the_commit(tmp_path):
    folder = kaggle_api.build_library_dataset(USER, tmp_path / "library")
    meta = json.loads((folder / "dataset-metadata.json").read_text())
    assert meta == {"title": "kaggle-utils prompt recovery", "id": f"{USER}/kaggle-utils-prompt-recovery",
                    "licenses": [{"name": "CC0-1.0"}]}
    wheel = next(folder.glob("kaggle_utils_prompt_recovery-*.whl"))
    stamp = (folder / "COMMIT").read_text().strip()
    with zipfile.ZipFile(wheel) as z:
        assert z.read("kaggle_utils/COMMIT").decode().strip() == stamp
        assert "kaggle_utils/kernels.py" in z.namelist()
    assert not (REPO / "kaggle_utils" / "COMMIT").exists(), "the checkout must not get a stale COMMIT file"


def test_adapters_dataset_copies_every_planned_adapter_or_names_the_missing(tmp_path):
    plan = load_plan()
    with pytest.raises(FileNotFoundError, match=r"^adapters the plan needs are missing \(VARIANT=<slug> .*\n  .*"
                                                r"/runs/mistral-7b-v3/selected \(needed by mistral-v3-x10, mmml-v1, "
                                                r"mmml-v1-with-mean-prompt\): `make train-mistral RUN=mistral-7b-v3`, "
                                                r"then `make select RUN=mistral-7b-v3`"):
        kaggle_api.build_adapters_dataset(plan, USER, runs_dir=tmp_path / "runs", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for name in kernels.own_adapters(plan):
        _fake_adapter(tmp_path / "runs" / name / "selected")
    folder = kaggle_api.build_adapters_dataset(plan, USER, runs_dir=tmp_path / "runs", out=tmp_path / "out")
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(kernels.own_adapters(plan))
    assert json.loads((folder / "dataset-metadata.json").read_text())["id"] == f"{USER}/prompt-recovery-adapters"
    assert json.loads((folder / "adapters.json").read_text())["adapters"]["mistral-7b"] == {"step": 200}


def test_adapters_dataset_of_one_variant_needs_only_its_own_run(tmp_path):
    """After `make train-mistral` and `make select RUN=mistral-7b`, only runs/mistral-7b/selected/ exists: the
    user's own variant pushes it, while the whole plan still names the author's missing adapters."""
    plan = load_plan()
    assert kernels.own_adapters(plan, "my-mistral-7b") == {"mistral-7b": False}
    _fake_adapter(tmp_path / "runs" / "mistral-7b" / "selected")
    with pytest.raises(FileNotFoundError, match=r"^adapters the plan needs are missing \(VARIANT=<slug>"):
        kaggle_api.build_adapters_dataset(plan, USER, runs_dir=tmp_path / "runs", out=tmp_path / "all")
    folder = kaggle_api.build_adapters_dataset(plan, USER, runs_dir=tmp_path / "runs", out=tmp_path / "out",
                                            slug="my-mistral-7b")
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["mistral-7b"]
    assert (folder / "mistral-7b" / "adapter_model.safetensors").exists()
    with pytest.raises(ConfigError, match=r"^variant: no variant 'nope' in the plan"):
        kaggle_api.build_adapters_dataset(plan, USER, runs_dir=tmp_path / "runs", out=tmp_path / "x", slug="nope")


def test_wheels_command_asks_for_binary_wheels_of_kaggles_python(tmp_path):
    plan = load_plan()
    cmd = kaggle_api.wheels_download_command(tmp_path / "w")
    assert cmd[1:4] == ["-m", "pip", "download"] and "--only-binary=:all:" in cmd
    # Kaggle's GPU image runs Python 3.12 (its site-packages are /usr/local/lib/python3.12)
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and "manylinux2014_x86_64" in cmd
    platforms = {cmd[i + 1] for i, a in enumerate(cmd) if a == "--platform"}
    assert {"manylinux_2_27_x86_64", "manylinux_2_35_x86_64", "manylinux_2_17_x86_64"} <= platforms
    assert "manylinux_2_36_x86_64" not in platforms  # nothing newer than Kaggle's glibc
    assert cmd[cmd.index("-r") + 1].endswith("requirements-kaggle.txt")
    folder = kaggle_api.write_wheels_metadata(plan, kernels.PLACEHOLDER_USER, tmp_path / "w")
    assert kaggle_api.set_dataset_owner(folder, USER) == f"{USER}/prompt-recovery-wheels"
    assert (folder / "requirements-kaggle.txt").read_text() == (REPO / "requirements-kaggle.txt").read_text()


# ---------------------------------------------------------------- the real kaggle CLI against a stand-in server


class FakeKaggle:
    """A stand-in for Kaggle's API on 127.0.0.1, reached by the CLI as its HTTP proxy; records every request."""

    MAX_REQUESTS = 200  # a runaway client loop gets 500s, never an endless test

    def __init__(self):
        self.requests: list[dict] = []
        self.uploads: dict[str, bytes] = {}
        self.existing_datasets: set[str] = set()
        self.kernel_error = ""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: dict | None = None):
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> dict:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                entry = {"method": self.command, "path": self.path, "headers": dict(self.headers), "raw": raw}
                fake.requests.append(entry)
                return entry

            def do_CONNECT(self):  # an https request that slipped past the localhost endpoint: refuse, and remember
                self._record()
                self._reply(403, {"code": 403, "message": "the stand-in serves no https"})

            def do_PUT(self):
                entry = self._record()
                fake.uploads[self.path.rsplit("/", 1)[-1]] = entry["raw"]
                self._reply(200, {})

            def do_POST(self):
                entry = self._record()
                if len(fake.requests) > fake.MAX_REQUESTS:
                    return self._reply(500, {"code": 500, "message": "too many requests"})
                body = json.loads(entry["raw"] or b"{}")
                entry["body"] = body
                method = self.path.rsplit("/", 1)[-1]
                if method == "SaveKernel":
                    slug = body["slug"]
                    return self._reply(200, {"ref": f"/code/{slug}", "url": f"http://localhost/code/{slug}",
                                             "versionNumber": 7, "error": fake.kernel_error})
                if method == "GetDatasetStatus":
                    ref = f"{body.get('ownerSlug')}/{body.get('datasetSlug')}"
                    if ref in fake.existing_datasets:
                        return self._reply(200, {"status": "ready"})
                    return self._reply(404, {"code": 404, "message": f"dataset {ref} not found"})
                if method == "StartBlobUpload":
                    token = f"blob{len(fake.requests)}-{body['name']}"
                    return self._reply(200, {"token": token, "createUrl": f"http://localhost/upload/{token}"})
                if method in ("CreateDataset", "CreateDatasetVersion"):
                    return self._reply(200, {"ref": "d", "url": "http://localhost/datasets/d", "status": "ok"})
                if method == "CreateCodeSubmission":
                    return self._reply(200, {"message": "Submission successful", "ref": 4242})
                if method == "GetKernelSessionStatus":
                    return self._reply(200, {"status": "complete"})
                return self._reply(404, {"code": 404, "message": f"the stand-in has no {method}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def calls(self, method: str) -> list[dict]:
        return [r for r in self.requests if r["path"].endswith("/" + method)]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def fake_kaggle(monkeypatch, tmp_path):
    """The stand-in server, and an environment where the real kaggle CLI talks only to it, as the fake user."""
    fake = FakeKaggle()
    proxy = f"http://127.0.0.1:{fake.port}"
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")  # the CLI then calls http://localhost/api/v1/...
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy)  # ...which reaches the stand-in; so would any https call
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))  # the CLI keeps resumable-upload state there
    yield fake
    fake.close()
    assert not [r for r in fake.requests if r["method"] == "CONNECT"], "the CLI tried to leave for https"


def test_push_sends_our_metadata_and_notebook_through_the_real_cli(fake_kaggle, plan, rendered):
    folder = rendered["mmml-v1-with-mean-prompt"]
    assert kaggle_api.push_kernel(folder) == 7
    (call,) = fake_kaggle.calls("SaveKernel")
    assert call["path"] == "http://localhost/api/v1/kernels.KernelsApiService/SaveKernel"
    assert call["headers"]["Authorization"] == "Basic " + base64.b64encode(f"{USER}:{KEY}".encode()).decode()
    body = call["body"]
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    assert body["slug"] == meta["id"] == f"{USER}/mmml-v1-with-mean-prompt"
    assert body["newTitle"] == "MMML v1 with mean prompt"
    assert (body["language"], body["kernelType"]) == ("python", "notebook")
    assert body["isPrivate"] is True and body["enableGpu"] is True
    assert body["enableInternet"] is False
    assert body["machineShape"] == "NvidiaTeslaT4"
    assert body["competitionDataSources"] == ["llm-prompt-recovery"]
    assert body["datasetDataSources"] == meta["dataset_sources"]
    assert body["modelDataSources"] == meta["model_sources"]
    sent = nbformat.reads(body["text"], as_version=4)
    local = nbformat.read(folder / "inference.ipynb", as_version=4)
    assert [c.source for c in sent.cells] == [c.source for c in local.cells]
    assert sent.cells[0].source.startswith("# Added by `make render`")
    assert kernels.notebook_parameters(sent)["use_mean_prompt"] is True
    assert json.loads((folder / "push.json").read_text())["version"] == 7
    assert kaggle_api.pushed_version("mmml-v1-with-mean-prompt", folder.parent) == 7


def test_a_refused_push_is_an_error(fake_kaggle, rendered):
    fake_kaggle.kernel_error = "Notebook not found or you lack permission"
    folder = rendered["mmml-v2"]
    with pytest.raises(kaggle_api.KaggleCommandError, match=rf"^`kaggle kernels push -p {re.escape(str(folder))}`: "
                                                            r"Kernel push error: Notebook not found or you lack "
                                                            r"permission$"):
        kaggle_api.push_kernel(folder)
    assert not (folder / "push.json").exists()  # a refused push records no version


def test_datasets_are_created_then_versioned_with_folders_zipped(fake_kaggle, tmp_path):
    plan = load_plan()
    for name in kernels.own_adapters(plan):
        _fake_adapter(tmp_path / "runs" / name / "selected")
    folder = kaggle_api.build_adapters_dataset(plan, USER, runs_dir=tmp_path / "runs", out=tmp_path / "adapters")
    assert kaggle_api.push_dataset(folder, "first") == f"{USER}/prompt-recovery-adapters"
    (create,) = fake_kaggle.calls("CreateDataset")
    assert (create["body"]["ownerSlug"], create["body"]["slug"]) == (USER, "prompt-recovery-adapters")
    assert create["body"]["title"] == "Prompt recovery LoRA adapters"
    assert create["body"]["licenseName"] == "CC0-1.0" and create["body"].get("isPrivate", True) is True
    names = {c["body"]["name"] for c in fake_kaggle.calls("StartBlobUpload")}
    assert names == {f"{n}.zip" for n in kernels.own_adapters(plan)} | {"adapters.json"}
    upload = next(v for k, v in fake_kaggle.uploads.items() if k.endswith("-mistral-7b-v3.zip"))
    assert set(zipfile.ZipFile(io.BytesIO(upload)).namelist()) >= {"adapter_config.json", "adapter_model.safetensors"}
    assert len(create["body"]["files"]) == len(names)

    fake_kaggle.existing_datasets.add(f"{USER}/prompt-recovery-adapters")
    kaggle_api.push_dataset(folder, "second")
    (version,) = fake_kaggle.calls("CreateDatasetVersion")
    assert version["body"]["body"]["versionNotes"] == "second"


def test_submit_and_status_name_the_kernel_and_version(fake_kaggle):
    kaggle_api.submit_kernel(f"{USER}/mmml-v2", 7, "MMML v2 v7")
    (call,) = fake_kaggle.calls("CreateCodeSubmission")
    body = call["body"]
    assert body["competitionName"] == "llm-prompt-recovery"
    assert (body["kernelSlug"], body["kernelVersion"], body["fileName"]) == ("mmml-v2", 7, "submission.csv")
    assert "COMPLETE" in kaggle_api.kernel_status(f"{USER}/mmml-v2")


def _isolated_root(tmp_path: Path, notebook: Path) -> Path:
    """A copy of what scripts/submissions.py reads, as KAGGLE_UTILS_ROOT: its build/ lands here, not in the checkout."""
    root = tmp_path / "root"
    (root / "configs").mkdir(parents=True)
    (root / "notebooks").mkdir()
    for rel in ("configs/submissions.yaml", "configs/local-inputs.yaml", "dataset-metadata.json",
                "requirements-kaggle.txt"):
        shutil.copy2(REPO / rel, root / rel)
    shutil.copy2(notebook, root / "notebooks" / "inference.ipynb")
    return root


def test_make_push_without_credentials_stops_and_writes_nothing(tmp_path):
    root = _isolated_root(tmp_path, REAL_NOTEBOOK)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    env = {**os.environ, "KAGGLE_UTILS_ROOT": str(root)}
    # -o setup: the environment is already there; the test must not reinstall it.
    for target in ("push", "push-lib", "push-adapters", "status"):
        proc = subprocess.run(["make", "-s", "-o", "setup", "-C", str(REPO), target], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode != 0, target
        assert "needs Kaggle credentials" in proc.stderr and "~/.kaggle/kaggle.json" in proc.stderr, proc.stderr
        assert "KAGGLE_USERNAME and KAGGLE_KEY" in proc.stderr and "nothing was written" in proc.stderr
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_make_push_renders_and_pushes_every_variant(fake_kaggle, tmp_path):
    root = _isolated_root(tmp_path, REAL_NOTEBOOK)
    env = {**os.environ, "KAGGLE_UTILS_ROOT": str(root)}
    proc = subprocess.run(["make", "-s", "-o", "setup", "-C", str(REPO), "push"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [c["body"]["slug"] for c in fake_kaggle.calls("SaveKernel")] == [f"{USER}/{s}" for s in SLUGS]
    assert all((root / "build" / "kernels" / s / "push.json").exists() for s in SLUGS)
    proc = subprocess.run(["make", "-s", "-o", "setup", "-C", str(REPO), "submit", "VARIANT=mmml-v1"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fake_kaggle.calls("CreateCodeSubmission")[0]["body"]["kernelVersion"] == 7
    assert KEY not in proc.stdout + proc.stderr
