"""The quantization accuracy benchmark runs end to end on the tiny LLaVA and writes its JSON and table."""

import json

import pytest
from PIL import Image
from script_helpers import load_benchmark_script

from lowrank_kit.data.items import VQAItem
from lowrank_kit.data.tsv import write_tsv
from lowrank_kit.models.tiny import save_tiny_checkpoint


def _script():
    return load_benchmark_script("quant_accuracy")


def _items(n):
    colours = ["red", "green", "blue"]
    return [
        VQAItem(
            Image.new("RGB", (8, 8), (60 * i, 20, 90)),
            f"Which colour{'?' * (i + 1)}",
            colours,
            "ABC"[i % 3],
            index=i,
        )
        for i in range(n)
    ]


def test_smoke_run_writes_rows_and_resumes(tmp_path, monkeypatch):
    model = save_tiny_checkpoint("llava", tmp_path / "model")
    data = tmp_path / "items.tsv"
    write_tsv(_items(4), data)
    out, table = tmp_path / "quant.json", tmp_path / "table.md"
    rows = "fp16,svd@0.5,wsvd@0.5+w8a8-kv8-qat,hadamard+rtn w4a4"
    argv = [
        "--model", str(model), "--data", str(data), "--calib-source", "tsv", "--calib-path", str(data),
        "--calib-samples", "2", "--device", "cpu", "--max-new-tokens", "2", "--batch-size", "4",
        "--rows", rows, "--output", str(out), "--table", str(table),
    ]  # fmt: skip
    script = _script()
    script.main(argv)
    saved = json.loads(out.read_text())
    assert list(saved["rows"]) == rows.split(",") and saved["n"] == 4
    headline = saved["rows"]["wsvd@0.5+w8a8-kv8-qat"]
    assert headline["quant"] == "w8a8-kv8-qat" and headline["quant_methods"] == ["hadamard", "qat", "rtn"]
    assert abs(headline["cache_ratio_vs_fp16"] - headline["rho2"] / 2) < 1e-12
    assert headline["qat"]["mean_loss_after"] <= headline["qat"]["mean_loss_before"]
    w4a4 = saved["rows"]["hadamard+rtn w4a4"]
    assert w4a4["rho1"] is None and w4a4["cache_ratio_vs_fp16"] == 1.0
    assert all(0 <= r["accuracy"] <= 1 and r["kl"] >= 0 for r in saved["rows"].values())
    assert "| wsvd@0.5+w8a8-kv8-qat |" in table.read_text()
    # A rerun with the same output keeps the finished rows: nothing is compressed again.
    import lowrank_kit.eval.grid as grid

    calls = []
    monkeypatch.setattr(grid, "compress", lambda *a, **k: calls.append(a) or pytest.fail("recompressed"))
    script.main(argv)
    assert calls == []
    again = json.loads(out.read_text())["rows"]
    # FP16 is evaluated again (the reference of any row that is recomputed); only its time differs.
    assert {k: v for k, v in again.items() if k != "fp16"} == {
        k: v for k, v in saved["rows"].items() if k != "fp16"
    }
    assert again["fp16"]["accuracy"] == saved["rows"]["fp16"]["accuracy"]
