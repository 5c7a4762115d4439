"""`import lowrank_kit` then transformers' `from_pretrained` works, whatever was imported first."""

import json
import subprocess
import sys
import textwrap

import pytest
from ckpt_helpers import compressed
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

from lowrank_kit.checkpoint import save_compressed
from lowrank_kit.errors import LowRankError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_compressed(compressed("qwen2_vl", "qsvd"), tmp_path_factory.mktemp("hf") / "ckpt")


LOAD = """
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained({path!r})
attn = model.model.language_model.layers[0].self_attn
print(json.dumps({{"q": type(attn.q_proj).__name__, "quantizer": type(model.hf_quantizer).__name__}}))
"""

ORDERS = {
    "lowrank_kit first": "import json, sys\nimport lowrank_kit\n"
    "assert 'transformers' not in sys.modules, 'import lowrank_kit imported transformers'\n",
    "transformers first (lazy)": "import json\nimport transformers\nimport lowrank_kit\n",
    "registry already loaded": "import json\nimport transformers.quantizers.auto\nimport lowrank_kit\n",
    "explicit register": "import json\nimport lowrank_kit.hf_integration\nlowrank_kit.hf_integration.register()\n",
}


def test_from_pretrained_after_import_lowrank_kit(ckpt):
    # One interpreter per import order, run side by side (each pays the transformers import).
    procs = {
        order: subprocess.Popen(
            [sys.executable, "-c", code + textwrap.dedent(LOAD.format(path=str(ckpt)))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for order, code in ORDERS.items()
    }
    for order, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{order}: {stderr[-2000:]}"
        out = json.loads(stdout.strip().splitlines()[-1])
        assert out == {"q": "JointLowRankProjection", "quantizer": "LowRankHfQuantizer"}, order


def test_register_is_idempotent():
    from lowrank_kit.hf_integration import LowRankHfQuantizer, register

    register()
    register()
    assert AUTO_QUANTIZER_MAPPING["lowrank"] is LowRankHfQuantizer


def test_a_conflicting_registration_is_an_error(monkeypatch):
    from transformers.quantizers.base import HfQuantizer

    from lowrank_kit.hf_integration import register

    class Other(HfQuantizer):
        pass

    monkeypatch.setitem(AUTO_QUANTIZER_MAPPING, "lowrank", Other)
    with pytest.raises(
        LowRankError, match="already has a quantization quantizer .*Other for quant_method 'lowrank'"
    ):
        register()
