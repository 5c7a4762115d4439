"""--backend vlmeval against a real VLMEvalKit: same prompts, same answers and the same score as native.

CI does not install VLMEvalKit (it comes from its git repository, not PyPI), so these run where it is
installed; docs/evaluation.md records the run.
"""

import pytest
from eval_helpers import make_items

from lowrank_kit.data.tsv import write_tsv
from lowrank_kit.eval.datasets import load_eval_data
from lowrank_kit.eval.engine import evaluate
from lowrank_kit.eval.vlmeval_bridge import vlmeval_available

pytestmark = pytest.mark.skipif(
    not vlmeval_available(), reason="VLMEvalKit is not installed (see docs/evaluation.md)"
)


@pytest.mark.parametrize("style", ["letter", "dataset"])
def test_bridge_matches_the_native_evaluator(tmp_path, style):
    from lowrank_kit.eval.vlmeval_bridge import evaluate_with_vlmeval
    from lowrank_kit.loading import load_model
    from lowrank_kit.models.tiny import save_tiny_checkpoint

    save_tiny_checkpoint("llava", tmp_path / "model")
    write_tsv(make_items(6), tmp_path / "data.tsv")
    loaded = load_model(str(tmp_path / "model"))
    summary = evaluate_with_vlmeval(
        loaded, str(tmp_path / "data.tsv"), max_new_tokens=4, prompt_style=style, work_dir=tmp_path / "work"
    )
    items = load_eval_data(str(tmp_path / "data.tsv")).items
    native = evaluate(
        loaded.model, loaded.processor, loaded.adapter, items, max_new_tokens=4, prompt_style=style
    )
    assert summary["raw_predictions"] == [r.prediction for r in native.items]
    assert [row["index"] for row in summary["items"]] == [str(r.index) for r in native.items]
    assert summary["accuracy"] == pytest.approx(native.accuracy)
    assert summary["generate_calls"] == 6
