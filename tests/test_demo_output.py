"""The console tells the story: our step and progress lines on screen, third-party noise in the run's log file.

The CLI runs as a subprocess (the console script's own process, as a user runs it), against this session's
state dir and Prefect test server.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from testing_utils import small_config

from tasks.core import quiet
from tasks.core.settings import PROJECT_ROOT

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# What a newcomer saw bury the demo: MLflow's artifact bars, huggingface_hub's repo card warning, transformers'
# generation-config warning, and Prefect's own INFO lines.
NOISE = ("Downloading artifacts", "Repo card metadata", "generation flags", "Finished in state",
         "Created task run", "Beginning flow run", "View at ")
MODEL = "demo-output"

# ---------------------------------------------------------------------------------------------- units


def test_step_lines_read_as_a_story():
    assert quiet.step_line("deploy", "start") == "start   deploy"
    assert quiet.step_line("deploy", "done", 74.04) == "done    deploy (74.0s)"
    assert quiet.step_line("deploy", "failed", 3.14, "DeployError: port busy") == (
        "FAILED  deploy after 3.1s: DeployError: port busy")


def test_progress_line_has_count_loss_and_time_left():
    assert quiet.progress_line("fine-tune", 40, 500, 20.0, loss=1.23456) == (
        "fine-tune step 40/500 (8%) loss 1.235 ETA 3m50s")
    assert quiet.progress_line("eval", 50, 50, 61.0, unit="example") == "eval example 50/50 (100%) in 1m01s"
    assert quiet.progress_line("fine-tune", 1, 10, 1.0, loss=float("nan")) == "fine-tune step 1/10 (10%) ETA 9s"
    assert quiet.duration(3725) == "1h02m"


def test_log_file_name_is_per_command_and_time(tmp_path: Path):
    path = quiet.log_file_for("lifecycle", tmp_path, datetime(2026, 12, 2, 3, 4, 5))
    assert path == tmp_path / "logs" / "lifecycle-20261202-030405.log"


def test_progress_without_a_terminal_logs_about_every_five_percent(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="llmhost"):
        bar = quiet.progress("fine-tune", 100, draw=True)  # no console set up: lines, never a bar
        for n in range(1, 101):
            bar.update(n, loss=2.0 - n / 100)
        bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "llmhost"]
    assert len(lines) == 21  # the first step, then every 5 steps
    assert lines[0].startswith("fine-tune step 1/100 (1%) loss 1.990 ETA")
    assert lines[-1].startswith("fine-tune step 100/100 (100%) loss 1.000 in")


def test_step_context_says_start_and_end_and_passes_lines_to_the_run_logger(caplog: pytest.LogCaptureFixture):
    seen: list[str] = []
    with pytest.raises(RuntimeError), quiet.step("compare", also=seen.append):
        raise RuntimeError("gateway down\nmore detail")
    assert seen[0] == "start   compare"
    assert re.fullmatch(r"FAILED  compare after \d+\.\ds: gateway down", seen[1])


def test_library_banners_on_stdout_go_to_the_log_file_once_the_cli_set_it_up(tmp_path: Path, monkeypatch,
                                                                              capsys: pytest.CaptureFixture[str]):
    with quiet.redirect_stdout_to_log():  # no CLI setup (a worker, a test): stdout is left alone
        print("kept")
    monkeypatch.setattr(quiet._state, "log_path", tmp_path / "run.log")
    with quiet.redirect_stdout_to_log():
        sys.stdout.write("\n\x1b[94m✨ Evaluation completed.\x1b[0m\n")
    assert capsys.readouterr().out == "kept\n"
    assert "Evaluation completed" in (tmp_path / "run.log").read_text()
    # A progress bar drawn on stderr (mlflow.genai.evaluate's tqdm) goes there too.
    with quiet.redirect_output_to_log():
        sys.stderr.write("Evaluating:  50%|#####     | 120/240\r")
    assert capsys.readouterr().err == ""
    assert "Evaluating:  50%" in (tmp_path / "run.log").read_text()


# ---------------------------------------------------------------------------------------------- the CLI


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    import prefect.settings

    env = dict(os.environ)
    env.update({"LLMHOST_HOME": str(home), "PREFECT_API_URL": str(prefect.settings.PREFECT_API_URL.value()),
                "LLMHOST_RAISE_ERRORS": ""})
    for k in ("PYTEST_CURRENT_TEST", "COLUMNS"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def _check_quiet(proc: subprocess.CompletedProcess[str]) -> Path:
    """No third-party noise on the console; the log path printed once; returns that log file."""
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    for noise in NOISE:
        assert noise not in console, f"{noise!r} on the console:\n{console[-3000:]}"
    assert not ANSI.search(console), console[-3000:]
    paths = re.findall(r"^log: (.+\.log)$", proc.stderr, re.M)
    assert len(paths) == 1, proc.stderr[-3000:]
    assert proc.stdout.count("log: ") == 0
    return Path(paths[0])


@pytest.fixture(scope="module")
def registered(llmhost_home: Path, demo_model_dir: Path) -> tuple[subprocess.CompletedProcess[str], int]:
    proc = _cli("register", f"path:{demo_model_dir}", "--name", MODEL, "--json", home=llmhost_home)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc, int(json.loads(proc.stdout)["version"])


def test_register_keeps_mlflow_in_the_log_file_and_stdout_clean_json(registered, llmhost_home: Path):
    proc, version = registered
    log = _check_quiet(proc)
    assert log.parent == llmhost_home / "logs" and log.name.startswith("register-")
    assert json.loads(proc.stdout)["name"] == MODEL  # --json stays parseable: our lines go to stderr
    # MLflow's own log lines (its store's alembic migrations on a new state dir, its registry INFO lines) were
    # redirected, not lost; which of them appear depends on what the state dir already holds.
    assert re.search(r"^\S+ \S+ (INFO|WARNING) (mlflow|alembic)", log.read_text(), re.M), log.read_text()[-2000:]


@pytest.mark.slow
def test_finetune_shows_step_loss_and_eta_and_nothing_else(registered, llmhost_home: Path, demo_data_dir: Path,
                                                           tmp_path: Path):
    _, version = registered
    cfg = small_config(demo_data_dir, f"models:/{MODEL}/{version}", max_steps=10, eval_steps=5)
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = _cli("finetune", "--config", str(path), home=llmhost_home)
    log = _check_quiet(proc)
    steps = re.findall(r"^fine-tune step (\d+)/10 \(\d+%\) loss \d+\.\d{3} (?:ETA|in) \S+$", proc.stderr, re.M)
    assert [int(s) for s in steps] == list(range(1, 11)), proc.stderr[-3000:]
    assert "ETA" in proc.stderr
    assert "trained 10 steps" in proc.stdout
    text = log.read_text()
    assert "Finished in state" in text  # Prefect's INFO lines are kept, in the file
    assert "fine-tune step 10/10" in text


def test_size_of_a_registry_ref_prints_the_plan_without_download_bars(registered, llmhost_home: Path):
    _, version = registered
    proc = _cli("size", f"models:/{MODEL}/{version}", "--max-model-len", "1024", "--json", home=llmhost_home)
    log = _check_quiet(proc)
    assert log.name.startswith("size-")
    assert json.loads(proc.stdout)  # the plan, as JSON on a clean stdout


def test_an_eval_without_a_bar_still_counts_examples(caplog: pytest.LogCaptureFixture):
    """Flows evaluate with progress=False: the runner then reports examples done about every 5%, as lines."""
    from tasks.evaluate.runner import _progress

    with caplog.at_level(logging.INFO, logger="llmhost"), _progress(False, 40, "endpoint:demo") as tick:
        for _ in range(40):
            tick()
    lines = [r.getMessage() for r in caplog.records if r.name == "llmhost"]
    assert lines[0].startswith("eval endpoint:demo example 1/40 (2%)"), lines
    assert lines[-1].startswith("eval endpoint:demo example 40/40 (100%) in"), lines
    assert 15 <= len(lines) <= 25, lines
