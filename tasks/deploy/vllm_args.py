"""Check a spec's `vllm.extra_args` with the installed vLLM's own argument parser, before anything starts.

The control plane never imports vLLM: the runtime venv (`settings.vllm_python`) parses the args in a subprocess
with the parser `vllm serve` builds (`make_arg_parser(FlexibleArgumentParser())`), then vLLM's own quick checks
(`validate_parsed_serve_args`). Importing vLLM there costs 10-30 s on a 2-core machine, so each verdict is
cached on disk under the state dir, keyed on the runtime's vLLM version and the args: a spec pays once.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from tasks.core.errors import ConfigError, ServingError
from tasks.core.settings import get_settings
from tasks.register.vllm_compat import _runtime_version_from_disk

MARKER = "LLMHOST_VLLM_ARGS="
FIELD = "vllm.extra_args"

# Runs inside the runtime venv: argv[1] is the JSON list of args. argparse reports a bad argument by calling
# parser.error (usage on stderr, exit 2); it is replaced so that the verdict is one line.
_PROBE = f"""
import json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args

class Refused(Exception):
    pass

def refuse(message):
    raise Refused(message)

parser = make_arg_parser(FlexibleArgumentParser())
parser.error = refuse
args = json.loads(sys.argv[1])
try:
    validate_parsed_serve_args(parser.parse_args(["--model", "llmhost-check", *args]))
    verdict = {{"ok": True, "error": ""}}
except (Refused, ValueError, TypeError) as exc:
    verdict = {{"ok": False, "error": " ".join(str(exc).split())}}
print({MARKER!r} + json.dumps(verdict))
"""


def _cache_file(python: Path, version: str, args: list[str]) -> Path:
    key = hashlib.sha256(json.dumps([str(python), version, args]).encode()).hexdigest()[:16]
    return get_settings().home_abs / "cache" / f"vllm-args-{key}.json"


def _probe(python: Path, args: list[str], timeout_s: float) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    try:
        proc = subprocess.run([str(python), "-c", _PROBE, json.dumps(args)], capture_output=True, text=True,
                              timeout=timeout_s, env=env, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServingError(f"vllm_python={str(python)!r} could not check vllm.extra_args ({type(exc).__name__}: "
                           f"{exc}); rebuild the runtime with `make runtime` or set LLMHOST_VLLM_PYTHON") from exc
    for line in proc.stdout.splitlines():
        if line.startswith(MARKER):
            verdict: dict[str, object] = json.loads(line[len(MARKER):])
            return verdict
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise ServingError(f"vllm_python={str(python)!r} could not check vllm.extra_args (exit {proc.returncode}: "
                       f"{last}); rebuild the runtime with `make runtime` or set LLMHOST_VLLM_PYTHON")


def check_extra_args(args: list[str], *, python: Path | None = None, timeout_s: float = 180.0) -> None:
    """Raise ConfigError naming the args when the installed vLLM's parser refuses them; nothing when it accepts.

    Without a runtime venv there is no parser to ask (and no vLLM to start): the args pass unchecked.
    """
    if not args:
        return
    python = Path(python or get_settings().vllm_python)
    if not (python.is_file() and os.access(python, os.X_OK)):
        return
    version = _runtime_version_from_disk(python) or "unknown"
    cache = _cache_file(python, version, list(args))
    verdict: dict[str, object] | None = None
    if cache.is_file():
        try:
            verdict = json.loads(cache.read_text())
        except ValueError:
            verdict = None  # a corrupt cache is re-probed
    if verdict is None:
        verdict = _probe(python, list(args), timeout_s)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(verdict))
        tmp.replace(cache)
    if not verdict.get("ok"):
        raise ConfigError(FIELD, list(args), f"vLLM {version} refuses them ({verdict.get('error')}); fix or remove "
                          f"the argument (`{python} -m vllm.entrypoints.openai.api_server --help` lists vLLM's)")
