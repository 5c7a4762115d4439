"""A compressed checkpoint never loads wrong in a process that did not import lowrank_kit (issue 22).

transformers skips a ``quantization_config`` it does not know with a warning, so a checkpoint that kept
its model's own ``model_type`` would come back with randomly initialised q/k/v. Checkpoints say
``model_type: lowrank_kit`` (and carry a guard for the model's own class) instead: transformers alone
refuses them through an Auto class or the model's class with an error naming lowrank_kit, and with
lowrank_kit imported an Auto class builds the compressed model.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from ckpt_helpers import compressed, greedy

import lowrank_kit
from lowrank_kit.checkpoint import save_compressed
from lowrank_kit.hf_config import MODEL_TYPE
from lowrank_kit.models.tiny import TINY_FAMILIES, family_available, tiny_inputs

CASES = [(family, quant) for family in TINY_FAMILIES if family_available(family) for quant in (None, "w8a8")]

PLAIN = """
import json, sys
import transformers
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
out = {}
for path, text_only, own in json.loads(sys.argv[1]):
    classes = {
        "auto": AutoModelForCausalLM if text_only else AutoModelForImageTextToText,
        "own class": getattr(transformers, own),
    }
    for how, cls in classes.items():
        try:
            cls.from_pretrained(path)
            out[f"{path} {how}"] = None
        except Exception as err:
            out[f"{path} {how}"] = f"{type(err).__name__}: {err}"
assert "lowrank_kit" not in sys.modules, "the check imported lowrank_kit"
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    out = {}
    for family, quant in CASES:
        result = compressed(family, "svdllm", quant=quant)
        path = save_compressed(result, root / f"{family}-{quant or 'float'}")
        out[(family, quant)] = (path, result.adapter.text_only, result.adapter.model_class)
    return out


def test_config_names_lowrank_kit_and_keeps_the_model_type(checkpoints):
    path, *_ = checkpoints[("llama", None)]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE
    assert config["lowrank_config"]["base_model_type"] == "llama"
    assert config["lowrank_kit_guard"]["model_type"] == "llama"


def test_the_loaded_config_has_no_guard(checkpoints):
    path, *_ = checkpoints[("qwen2", None)]
    config = lowrank_kit.load(path).model.config
    assert config.model_type == "qwen2" and not hasattr(config, "lowrank_kit_guard")


def test_transformers_without_lowrank_kit_refuses_every_checkpoint(checkpoints):
    args = [[str(path), text_only, own] for path, text_only, own in checkpoints.values()]
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PLAIN), json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    for (family, quant), (path, _, _) in checkpoints.items():
        for how in ("auto", "own class"):
            err = errors[f"{path} {how}"]
            assert err is not None, (
                f"{family} {quant} {how}: transformers alone loaded a compressed checkpoint"
            )
            assert "lowrank_kit" in err, f"{family} {quant} {how}: {err[:300]}"


@pytest.mark.parametrize(
    "key,cls,message",
    [
        (("llava", "w8a8"), "AutoModelForImageTextToText", "model type `lowrank_kit`"),
        (
            ("llama", "w8a8"),
            "LlamaForCausalLM",
            "this is a lowrank_kit checkpoint: load it with lowrank_kit.load(path)",
        ),
    ],
)
def test_the_issues_one_liner_in_a_fresh_process_exits_non_zero_naming_lowrank_kit(
    checkpoints, key, cls, message
):
    path, *_ = checkpoints[key]
    code = f"from transformers import {cls} as A; A.from_pretrained({str(path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr


@pytest.mark.parametrize("family,quant", [("llava", None), ("qwen2", "w8a8")])
def test_with_lowrank_kit_imported_the_auto_class_gives_lowrank_kit_load(checkpoints, family, quant):
    from ckpt_helpers import hf_auto_class

    path, *_ = checkpoints[(family, quant)]
    loaded = lowrank_kit.load(path)
    auto = hf_auto_class(loaded.adapter).from_pretrained(path).eval()
    assert auto.config.model_type == loaded.config.model_type != MODEL_TYPE
    inputs = tiny_inputs(loaded.model, seed=3)
    torch.testing.assert_close(greedy(auto, inputs), greedy(loaded.model, inputs), rtol=0, atol=0)
