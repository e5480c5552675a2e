"""The GPU benchmark scripts' CPU smoke modes, so a change to the library they drive cannot break them unseen.

Run: `pytest tests/test_benchmarks.py`. The GPU numbers themselves are in BENCHMARKS.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], out: Path) -> dict:
    proc = subprocess.run([sys.executable, *args, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_check_architectures_tiny_mixtral_trains_and_loads_a_real_checkpoint(tmp_path):
    results = _run(["benchmarks/check_architectures.py", "--tiny", "--presets", "mixtral-8x7b",
                    "--work_dir", str(tmp_path / "work")], tmp_path / "out")
    row = results["steps"]["mixtral-8x7b"]
    assert "error" not in row, row.get("traceback")
    assert row["ok"] and row["train"]["finite"] and row["train"]["adapter_changed"]
    assert row["train"]["how"].startswith("TRL SFTTrainer")
    ckpt = row["checkpoint_load"]
    assert ckpt["ok"] and ckpt["experts_modules"] == 2 and ckpt["float_3d_params"] == 0
    assert ckpt["train"]["adapter_tensors_changed"] == "16/16"
    assert "real 2-layer checkpoint" in (tmp_path / "out" / "results.md").read_text()


def test_generation_speed_tiny_times_every_cpu_method(tmp_path):
    """Every phase that runs on CPU, on short prompts (60-160 tokens) so the CPU keeps up: one row at a time,
    generate in batches, the fast path (forced on CPU) at n=1 and n=4, and transformers' static cache with its
    forward compiled (``hf_static``, ``hf_static_n4``) in the fast path's engine batches; the comparison's ratios."""
    lengths = tmp_path / "lengths.json"
    lengths.write_text(json.dumps({"prompt_tokens": [60, 80, 100, 120, 140, 160]}))
    results = _run(["benchmarks/generation_speed.py", "--model", "tiny", "--rows", "16", "--fast_batch_size", "8",
                    "--max_new_tokens", "8", "--lengths_file", str(lengths), "--work_dir", str(tmp_path / "work"),
                    "--skip", "fast_repeat", "ablations", "quant", "tests", "vllm_lora", "vllm_merged"],
                   tmp_path / "out")
    text = (tmp_path / "out" / "results.md").read_text()
    assert "one row at a time" in text and "roofline" in text
    steps = results["steps"]
    rows = steps["summary"]["rows"]
    assert set(rows) == {"one_row", "hf_batches", "fast", "fast_n4", "hf_static", "hf_static_n4"}
    assert all(r["rows_per_s"] > 0 and r["rows"] > 0 for r in rows.values())
    for key, n, per_call in (("hf_static", 1, 8), ("hf_static_n4", 4, 2)):
        r = steps[key]
        assert "error" not in r, r.get("traceback")
        assert r["completions"] == 16 * n and r["new_tokens_per_row"] == [8]  # EOS never sampled: all 8 tokens
        assert r["batch_rows_per_call"] == per_call and r["batch_rows"] == [per_call] * (16 // per_call)
        assert r["compile"] and r["compiled_forward_built"] and r["dynamo"]["unique_graphs"] >= 1
    versus = steps["summary"]["static_vs_fast"]
    assert set(versus) == {"n1", "n4"}
    for v in versus.values():
        assert v["same_batches"] and v["ratio_end_to_end"] > 0 and v["ratio_steady"] > 0
        assert v["ratio_end_to_end"] == pytest.approx(v["fast_rows_per_s_end_to_end"]
                                                      / v["hf_static_rows_per_s_end_to_end"])
    assert steps["hf_static_vs_fast"]["ratio_end_to_end"] == versus["n1"]["ratio_end_to_end"]
    assert steps["hf_static_n4_vs_fast_n4"]["ratio_end_to_end"] == versus["n4"]["ratio_end_to_end"]
    assert "fast / hf_static, end to end" in text and "static cache + torch.compile" in text


def test_host_dispatch_counts_the_ops_and_times_pinned_processes_together(tmp_path):
    """The host-dispatch probe with a short window: Mistral-7B's 32-layer LoRA step counted, one process pinned
    alone, then two pinned processes (the box's first and last CPU) started together and timed over one window."""
    cpus = sorted(os.sched_getaffinity(0))
    pair = f"{cpus[0]},{cpus[-1]}"
    results = _run(["benchmarks/host_dispatch.py", "--tokens", "40", "--window_s", "2", "--cases", str(cpus[0]),
                    pair], tmp_path / "out")
    assert results["ops"]["aten_calls"] > 10_000  # 32 layers x seven LoRA projections, checkpointed
    alone, two = results["cases"]
    assert [p["cpu"] for p in alone["processes"]] == [cpus[0]]
    assert [p["cpu"] for p in two["processes"]] == [cpus[0], cpus[-1]]
    for p in alone["processes"] + two["processes"]:
        began, ended = p["window"]
        assert p["steps"] >= 1 and ended - began >= 2 and p["s_per_micro_step"] == pytest.approx(
            (ended - began) / p["steps"], rel=1e-3)
    assert two["overlap"] > 0.5  # started together: most of the window ran at once
    assert two["x_alone"] == pytest.approx(two["mean_s"] / alone["mean_s"])
    assert f"| {pair} |" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize("case", ["99999", "0,x"])
def test_host_dispatch_refuses_a_case_it_cannot_pin_before_building_anything(tmp_path, case):
    proc = subprocess.run([sys.executable, "benchmarks/host_dispatch.py", "--out", str(tmp_path), "--cases", case],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and f"--cases '{case}'" in proc.stderr
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_training_speed_tiny_compares_one_and_two_processes_over_the_same_rows(tmp_path):
    """The training benchmark's phases on CPU: one process and two (gloo) through distributed.launch, timed from the
    metrics log, and the same losses step by step (the same rows per optimizer step)."""
    results = _run(["benchmarks/training_speed.py", "--models", "tiny", "--steps", "3", "--qlora", "",
                    "--work_dir", str(tmp_path / "work")], tmp_path / "out")
    one, two = results["steps"]["tiny/1"], results["steps"]["tiny/2"]
    for r in (one, two):
        assert "error" not in r, r.get("tail")
        assert r["timed_steps"] == 2 and r["samples_per_s"] > 0 and r["lora_moved"]
        assert r["final"]["global_step"] == 3
    assert (one["micro_batch_size"], one["accumulation"], two["accumulation"]) == (2, 8, 4)
    # each process timed its own steps: 7 micro steps before the last on one process, 3 on each of two
    assert set(one["per_process"]) == {"0"} and set(two["per_process"]) == {"0", "1"}
    assert all(t["steps"] == 2 and t["s_per_micro_step"] > 0 for t in two["per_process"].values())
    row = next(r for r in results["steps"]["summary"]["rows"] if r["processes"] == 2)
    assert row["loss_vs_one_gpu"]["steps"] == 3 and row["loss_vs_one_gpu"]["max_abs_diff"] < 1e-3
    assert (tmp_path / "out" / "loss_curves.png").stat().st_size > 0
    assert "| tiny | 2 | 2 x 4 |" in (tmp_path / "out" / "results.md").read_text()


def test_generation_speed_vllm_phases_start_each_engine_once_on_fresh_prompts(tmp_path, monkeypatch):
    """The vLLM phases' bookkeeping on CPU, with a stand-in for vLLM's engine: the adapter phase starts on the base
    with the adapter, the merged phase on the merged folder with none; n=1, n=4 and the one-call run each get prompts
    no earlier timed run saw; every phase is in the summary."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _common as common
    import generation_speed as gs

    from kaggle_utils import engines

    starts, seen = [], []

    class FakeVLLM:
        rows_per_call = 128

        @classmethod
        def from_preset(cls, preset, base_model_path="", adapter_path="", **kwargs):
            starts.append((Path(base_model_path).name, adapter_path, kwargs["options"].dtype))
            return cls()

        def generate_batches(self, originals, rewrittens, cfg, skip=frozenset(), progress=True):
            seen.append((tuple(originals), cfg.n, self.rows_per_call))
            yield list(range(len(originals))), [["Rewrite it."] * cfg.n for _ in originals]

        def close(self):
            pass

    monkeypatch.setattr(engines, "VLLMEngine", FakeVLLM)
    tok = common.word_tokenizer(500)
    base = common.save_model_folder(common.build_random_model("tiny", device="cpu", vocab_size=500), tok,
                                    tmp_path / "base")
    cfg = gs.Config(out=str(tmp_path / "out"), rows=20, vllm_dtype="float16", vllm_one_call=True)
    rec = common.Recorder(tmp_path / "out", cfg)
    lengths = [90, 120, 150, 100] * 5  # 20 rows; the warm-up batch after each start has 16
    results = gs.vllm_phases_run(cfg, rec, ["vllm_lora", "vllm_merged"], base, tmp_path / "adapter",
                                 tmp_path / "merged", lengths, 500)
    assert starts == [("base", str(tmp_path / "adapter"), "float16"), ("merged", "", "float16")]
    assert set(results) == {"vllm_lora_n1", "vllm_lora_n4", "vllm_lora_n1_one_call", "vllm_merged_n1",
                            "vllm_merged_n4"}
    timed = [s for s in seen if len(s[0]) == len(lengths)]  # the warm-up batches are shorter
    assert [(n, per_call) for _, n, per_call in timed] == [(1, 128), (4, 128), (1, 20), (1, 128), (4, 128)]
    prompts = [p for s in timed for p in s[0]]
    assert len(set(prompts)) == len(prompts)  # no timed prompt was ever sent before
    assert all(r["completions"] == r["rows"] * n for r, n in zip(results.values(), (1, 4, 1, 1, 4)))
    roof = {"rows_per_s": 100.0, "seconds": 1.0, "rows": 20, "mean_prompt_tokens": 120.0, "t_prefill_s": 0.5,
            "t_decode_s": 0.5}
    summary = gs.summarize(cfg, {"device": "cpu"}, roof, results)
    assert set(summary["rows"]) == set(results)
    assert "merged folder, LoRA off, n=4 [float16]" in summary["rows"]["vllm_merged_n4"]["how"]


def test_training_speed_reads_the_cards_clocks_under_load(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import training_speed as ts

    csv = tmp_path / "phase.gpu.csv"
    csv.write_text("0, 1980, 650.5, 100\n1, 1500, 700.0, 99\n0, 1900, 640.0, 98\n1, 345, 90.1, 0\n"
                   "0, [N/A], 1.0, 100\nnot a sample\n")
    got = ts.gpu_load_summary(csv)
    assert got == {0: {"samples": 2, "sm_mhz": 1940.0, "watts": 645.25}, 1: {"samples": 1, "sm_mhz": 1500.0,
                                                                          "watts": 700.0}}
    assert ts.gpu_load_summary(tmp_path / "missing.csv") == {}


@pytest.mark.slow
def test_kernel_e2e_tiny_runs_the_submission_notebook_and_times_its_parts(tmp_path):
    """The end-to-end kernel benchmark on CPU: the workload is built, the notebook runs headless through papermill,
    and every test id gets a prediction; the table has the engine start and sampling seconds of the run."""
    results = _run(["benchmarks/kernel_e2e.py", "--model", "tiny", "--rows", "6", "--engine", "hf", "--arms", "lora",
                    "--n", "2", "--max_new_tokens", "4", "--work_dir", str(tmp_path / "work")], tmp_path / "out")
    arm = results["steps"]["arm_0_lora"]
    assert arm["rc"] == 0 and arm["submission_ok"], arm.get("error")
    (line,) = results["steps"]["end_to_end"]
    assert line["engine"] == "hf" and line["rows"] == 6 and line["n"] == 2
    assert line["start_s"] > 0 and line["sampling_s"] > 0 and line["end_to_end_s"] >= line["sampling_s"]
    assert "| lora (hf) | 2 |" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.slow
def test_cpu_training_levers_times_each_arm_against_the_recipe(tmp_path):
    """Two runs of the CPU recipe (the real SmolLM2, a few steps each): the recipe and an arm with longer prompts;
    each timed from its own step log, the arm's ratio taken against the baseline of its round."""
    result = _run(["benchmarks/cpu_training_levers.py", "--steps", "4", "--reps", "1",
                   "--arm", "long:max_prompt_tokens=192,max_seq_length=288"], tmp_path)
    arms = {s["arm"]: s for s in result["summary"]}
    assert set(arms) == {"baseline", "long"}
    assert arms["long"]["overrides"] == {"max_prompt_tokens": 192, "max_seq_length": 288}
    assert arms["long"]["mean_tokens"] > arms["baseline"]["mean_tokens"]  # the override reached the training rows
    assert all(r["steps_timed"] == 2 and r["seconds_per_step"] > 0 for r in result["runs"])  # steps 2->3, 3->4
    assert arms["long"]["ratio"] == pytest.approx(arms["long"]["examples_per_s"] / arms["baseline"]["examples_per_s"])
    assert "| long |" in (tmp_path / "results.md").read_text()
