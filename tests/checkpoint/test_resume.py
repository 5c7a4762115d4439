"""A compression killed during calibration resumes from the cache and writes the same checkpoint."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from lowrank_kit.calib_cache import FAULT_ENV

HERE = Path(__file__).resolve().parent

# compress (wsvd: activation pass, gradient pass, fine-tuning per layer) and save, in a fresh interpreter.
SCRIPT = """
import json, sys
import lowrank_kit
from ckpt_helpers import samples_for
from lowrank_kit.checkpoint import save_compressed
from lowrank_kit.models.tiny import build_tiny_model

cache, out = sys.argv[1] or None, sys.argv[2]
model = build_tiny_model("llava")
recipe = lowrank_kit.recipe_from_flags(model="llava", method="wsvd", ratio=0.5, params={"finetune": True})
result = lowrank_kit.compress(model, recipe, calibration=samples_for(model), cache_dir=cache)
save_compressed(result, out)
print(json.dumps(result.report["calibration_cache"]))
"""


def run(cache, out, kill_after=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    env.pop(FAULT_ENV, None)
    if kill_after is not None:
        env[FAULT_ENV] = str(kill_after)
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(cache or ""), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc):
    stdout, stderr = proc.communicate(timeout=240)
    return proc.returncode, stdout, stderr


def test_killed_run_resumes_and_writes_the_same_checkpoint(tmp_path):
    cache = tmp_path / "cache"
    # The uninterrupted reference (no cache) runs beside the run that gets killed.
    reference = run(None, tmp_path / "reference")
    killed = run(cache, tmp_path / "resumed", kill_after=3)
    code, _, stderr = finish(killed)
    assert code == -signal.SIGKILL, stderr[-2000:]
    # Killed during fine-tuning, after the activation and gradient statistics and layer 0's factors.
    [run_dir] = cache.iterdir()
    entries = sorted(p.name.split("-")[0] for p in run_dir.glob("*.safetensors"))
    assert entries == ["gradient_stats", "input_stats", "wsvd_finetune"]
    assert not (tmp_path / "resumed").exists()
    # No partial output of the killed run (the reference, still running beside it, may be mid-save).
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".resumed")]

    code, stdout, stderr = finish(run(cache, tmp_path / "resumed"))
    assert code == 0, stderr[-2000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert [e.split("-")[0] for e in summary["reused"]] == ["input_stats", "gradient_stats", "wsvd_finetune"]
    assert [e.split("-")[0] for e in summary["computed"]] == ["wsvd_finetune"]

    code, _, stderr = finish(reference)
    assert code == 0, stderr[-2000:]
    for name in ("model.safetensors", "config.json", "recipe.yaml"):
        resumed = (tmp_path / "resumed" / name).read_bytes()
        assert resumed == (tmp_path / "reference" / name).read_bytes(), name


def cli(*args, kill_after=None):
    """`lowrank ARGS...` in a fresh interpreter, as a user runs it."""
    env = dict(os.environ)
    env.pop(FAULT_ENV, None)
    if kill_after is not None:
        env[FAULT_ENV] = str(kill_after)
    code = "import sys; from lowrank_kit.cli.main import app; sys.argv[0] = 'lowrank'; app()"
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_killed_lowrank_compress_resumes_and_writes_the_same_checkpoint(tmp_path):
    from lowrank_kit.models.tiny import save_tiny_checkpoint

    src = save_tiny_checkpoint("llava", tmp_path / "model")
    # Not the testbed, so its default calibration is ScienceQA from the hub: name the generator explicitly.
    # Fine-tuning on, so that the run has a per-layer stage to be killed in and resume from.
    common = [
        "compress",
        "--model",
        src,
        "--method",
        "wsvd:finetune=true",
        "--ratio",
        "0.5",
        "--calib-samples",
        "4",
    ]
    common += ["--calib-source", "testbed"]
    code, _, stderr = finish(cli(*common, "--output", tmp_path / "reference", "--no-cache"))
    assert code == 0, stderr[-2000:]

    cache = ["--cache-dir", tmp_path / "cache"]
    killed = cli(*common, "--output", tmp_path / "resumed", *cache, kill_after=3)
    code, _, stderr = finish(killed)
    assert code == -signal.SIGKILL, stderr[-2000:]
    assert not (tmp_path / "resumed").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".resumed")]

    code, _, stderr = finish(cli(*common, "--output", tmp_path / "resumed", *cache, "--json"))
    assert code == 0, stderr[-2000:]
    report = json.loads((tmp_path / "resumed" / "lowrank_report.json").read_text())
    reused = [e.split("-")[0] for e in report["calibration_cache"]["reused"]]
    assert reused == ["input_stats", "gradient_stats", "wsvd_finetune"]
    for name in ("model.safetensors", "config.json", "recipe.yaml"):
        resumed = (tmp_path / "resumed" / name).read_bytes()
        assert resumed == (tmp_path / "reference" / name).read_bytes(), name
