"""Recipes: what to compress, with which calibration data, by which ordered steps.

A recipe is a pydantic model with ``extra="forbid"`` everywhere, loaded from and saved to YAML or JSON.
CLI flags build the same object (:func:`recipe_from_flags`). Method parameters are validated by the
config class each method registered (:func:`resolve_recipe`), and every validation failure is reported
as the field path plus the reason, e.g. ``steps[0].params.beta: Input should be less than or equal to 1``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lowrank_kit.errors import LowRankError, RecipeError
from lowrank_kit.models.base import TARGETS
from lowrank_kit.quant.schemes import resolve_scheme
from lowrank_kit.registry import get_decomposer, get_quantizer

RECIPE_VERSION = 1
Target = Literal["q_proj", "k_proj", "v_proj"]
DEFAULT_MODEL = "testbed"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CalibrationSpec(_Strict):
    """Where calibration samples come from and how many.

    ``source``: ``auto`` (the default: real data chosen for the model when it is loaded, see
    :func:`lowrank_kit.data.sources.default_calibration`: ScienceQA's train image questions for a VLM,
    wikitext-2 train for a text model, the generator for the testbed), ``testbed`` (the built-in
    generator's train split), ``tsv`` (a VLMEvalKit TSV at ``path``), ``hf`` (a ``datasets`` dataset with
    ScienceQA-style fields: a hub id in ``dataset`` with an optional ``config``, or a ``save_to_disk``
    directory in ``path``) or ``text`` (a text corpus in ``dataset``: ``text:pydoc``, ``text:PATH`` or
    ``hf:DATASET[:CONFIG]``; windows of ``max_length`` tokens with the loss on every token).
    """

    source: Literal["auto", "testbed", "tsv", "hf", "text"] = "auto"
    path: str | None = None
    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    num_samples: int = Field(64, gt=0)
    seed: int = 0
    max_length: int = Field(2048, gt=0)
    prompt_style: Literal["letter", "dataset"] = "letter"

    @model_validator(mode="after")
    def _source_fields(self) -> CalibrationSpec:
        if self.source == "tsv" and not self.path:
            raise ValueError("source 'tsv' needs `path` (a VLMEvalKit TSV file)")
        if self.source == "hf" and not (self.path or self.dataset):
            raise ValueError("source 'hf' needs `dataset` (a hub id) or `path` (a save_to_disk directory)")
        if self.source == "text" and not self.dataset:
            raise ValueError(
                "source 'text' needs `dataset`: a corpus such as text:pydoc, text:PATH or hf:ID[:CONFIG]"
            )
        return self


RHO1_MEANING = "ρ1 is the fraction of parameters kept"


def is_fraction(value: float) -> bool:
    """ρ1 and ρ2 are fractions kept: in (0, 1]."""
    return 0.0 < value <= 1.0


def _check_ratio(v: float) -> float:
    if not is_fraction(v):
        raise ValueError(f"ratio ρ1 must be in (0, 1] (fraction of parameters kept), got {v}")
    return v


class DecomposeStep(_Strict):
    """Low-rank decomposition of the targeted projections.

    Exactly one of ``ratio`` (ρ1 for every target), ``ratios`` (ρ1 per target) or ``rank`` (an explicit
    rank per matrix, or per head for per-head methods).
    """

    type: Literal["decompose"] = "decompose"
    method: str
    ratio: float | None = None
    ratios: dict[Target, float] | None = None
    rank: int | None = Field(None, ge=1)
    targets: list[Target] = Field(default_factory=lambda: list(TARGETS), min_length=1)
    rank_allocation: str | None = None
    granularity: int = Field(1, ge=1)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: float | None) -> float | None:
        return None if v is None else _check_ratio(v)

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None:
            for ratio in v.values():
                _check_ratio(ratio)
        return v

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"targets must not repeat, got {v}")
        return v

    @model_validator(mode="after")
    def _one_size(self) -> DecomposeStep:
        given = [k for k in ("ratio", "ratios", "rank") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of ratio, ratios, rank (got {', '.join(given) or 'none'})")
        if self.ratios is not None and set(self.ratios) != set(self.targets):
            raise ValueError(
                f"ratios must give one ratio per target {self.targets}, got {sorted(self.ratios)}"
            )
        return self

    def ratio_for(self) -> dict[str, float]:
        if self.ratios is not None:
            return dict(self.ratios)
        return {t: self.ratio for t in self.targets} if self.ratio is not None else {}


class QuantizeStep(_Strict):
    """Quantization by a named scheme (``w8a8``, ``w4a4``, ... with optional latent bits ``-kv8``)."""

    type: Literal["quantize"] = "quantize"
    scheme: str
    methods: list[str] | None = None
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)


Step = Annotated[DecomposeStep | QuantizeStep, Field(discriminator="type")]


class Recipe(_Strict):
    version: int = RECIPE_VERSION
    model: str = DEFAULT_MODEL
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    steps: list[Step] = Field(min_length=1)

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != RECIPE_VERSION:
            raise ValueError(
                f"recipe version {v} is not supported; this lowrank_kit reads version {RECIPE_VERSION}"
            )
        return v

    @model_validator(mode="after")
    def _one_decompose(self) -> Recipe:
        if sum(isinstance(s, DecomposeStep) for s in self.steps) > 1:
            raise ValueError("a recipe may contain at most one decompose step")
        decomposes = [i for i, s in enumerate(self.steps) if isinstance(s, DecomposeStep)]
        quantizes = [i for i, s in enumerate(self.steps) if isinstance(s, QuantizeStep)]
        if decomposes and quantizes and min(quantizes) < decomposes[0]:
            raise ValueError("quantize steps must come after the decompose step")
        return self

    @property
    def decompose(self) -> DecomposeStep | None:
        return next((s for s in self.steps if isinstance(s, DecomposeStep)), None)

    @property
    def quantize(self) -> list[QuantizeStep]:
        return [s for s in self.steps if isinstance(s, QuantizeStep)]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# -- errors -----------------------------------------------------------------------------------------


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("decompose", "quantize") and out.endswith("]"):
            continue  # the discriminated-union tag pydantic inserts into the path
        else:
            out += f".{part}" if out else str(part)
    return out or "recipe"


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    parts = []
    for e in err.errors():
        loc = _loc(tuple(e["loc"]))
        if prefix:
            loc = f"{prefix}.{loc}" if loc != "recipe" else prefix
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; unknown fields are not allowed)"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_recipe(data: Any, origin: str = "recipe") -> Recipe:
    """Validate a dict as a :class:`Recipe`; errors name the field path and the reason."""
    if not isinstance(data, dict):
        raise RecipeError(f"invalid {origin}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"invalid {origin}: {format_validation_error(err)}") from None


class _DuplicateKey(yaml.constructor.ConstructorError):
    def __init__(self, key: Any, lines: tuple[int, int] | None = None) -> None:
        super().__init__(problem=f"duplicate key {key!r}")
        self.key, self.lines = key, lines


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with one key twice (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` may be overridden by the keys beside it, as YAML intends
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, (seen[key], line))
            except TypeError:
                continue  # an unhashable key: the base class reports it
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe from a ``.yaml``/``.yml`` or ``.json`` file; a key given twice in one mapping is an error."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            data = json.loads(text, object_pairs_hook=_unique_json_object)
        else:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except _DuplicateKey as err:
        where = f" (lines {err.lines[0]} and {err.lines[1]})" if err.lines else ""
        raise RecipeError(
            f"recipe file {str(p)!r} sets {err.key!r} twice in one mapping{where}; keep one of them"
        ) from None
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RecipeError(
            f"recipe file {str(p)!r} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {first}"
        ) from None
    return parse_recipe(data, origin=f"recipe {str(p)!r}")


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    p = Path(path)
    text = json.dumps(recipe.to_dict(), indent=2) + "\n" if p.suffix == ".json" else recipe.to_yaml()
    p.write_text(text, encoding="utf-8")
    return p


def parse_method(label: str, flag: str = "--methods") -> tuple[str, dict[str, Any]]:
    """A method with parameters: ``name`` or ``name:key=value[:key=value...]`` (e.g. ``wsvd:finetune=true``),
    as ``--method`` and a grid's ``--methods`` take it.

    Values are read as YAML scalars (``false``, ``10``, ``1e-4``, ``eigen``); the parameters are
    checked against the method's config class when its recipes are resolved.
    """
    name, *pairs = label.split(":")
    params: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise RecipeError(
                f"{flag}: {label!r}: {pair!r} is not key=value; write a method with parameters as "
                "name:key=value[:key=value], e.g. wsvd:finetune=true"
            )
        if key.strip() in params:
            raise RecipeError(f"{flag}: {label!r} sets {key.strip()!r} twice")
        try:
            params[key.strip()] = yaml.safe_load(value.strip())
        except yaml.YAMLError:
            params[key.strip()] = value.strip()
    return name.strip(), params


def recipe_from_flags(
    *,
    model: str = DEFAULT_MODEL,
    method: str | None = None,
    ratio: float | None = None,
    rank: int | None = None,
    quant: str | None = None,
    calib_samples: int | None = None,
    seed: int | None = None,
    granularity: int | None = None,
    rank_allocation: str | None = None,
    calib_source: str | None = None,
    calib_path: str | None = None,
    calib_dataset: str | None = None,
    calib_config: str | None = None,
    calib_split: str | None = None,
    calib_max_length: int | None = None,
    params: dict[str, Any] | None = None,
    quant_methods: Sequence[str] | None = None,
) -> Recipe:
    """The recipe the CLI flags describe (``--method``, ``--ratio``, ``--quant``, ...).

    ``method`` may carry parameters (``wsvd:finetune=true``, :func:`parse_method`). ``params``: the decompose
    step's method parameters (``{"finetune": True}`` for wsvd), checked
    against the method's config class when the recipe is resolved. ``quant_methods``: the quantizers
    the quantize step runs, in order, instead of the scheme's own.
    """
    calibration: dict[str, Any] = {}
    if calib_samples is not None:
        calibration["num_samples"] = calib_samples
    if seed is not None:
        calibration["seed"] = seed
    if calib_source is not None:
        calibration["source"] = calib_source
    if calib_path is not None:
        calibration["path"] = calib_path
    if calib_dataset is not None:
        calibration["dataset"] = calib_dataset
        # A corpus spec names a text corpus; a bare hub id an hf dataset of image questions.
        if calib_source is None:
            calibration["source"] = "text" if calib_dataset.startswith(("text:", "hf:")) else "hf"
    if calib_config is not None:
        calibration["config"] = calib_config
    if calib_split is not None:
        calibration["split"] = calib_split
    if calib_max_length is not None:
        calibration["max_length"] = calib_max_length
    steps: list[dict[str, Any]] = []
    if method is not None:
        method, named = parse_method(method, "--method")
        clash = sorted(set(named) & set(params or {}))
        if clash:
            raise RecipeError(
                f"--method {method}:... and the method parameters both set {clash[0]!r}; give it once"
            )
        params = {**named, **(params or {})} or None
        step: dict[str, Any] = {"type": "decompose", "method": method}
        if ratio is not None:
            step["ratio"] = ratio
        if rank is not None:
            step["rank"] = rank
        if ratio is None and rank is None:
            raise RecipeError("--method needs --ratio (fraction of parameters kept, in (0, 1]) or --rank")
        if granularity is not None:
            step["granularity"] = granularity
        if rank_allocation is not None:
            step["rank_allocation"] = rank_allocation
        if params:
            step["params"] = dict(params)
        steps.append(step)
    elif ratio is not None or rank is not None or params:
        raise RecipeError("--ratio/--rank and method parameters need --method (see `lowrank methods`)")
    if quant is not None:
        qstep: dict[str, Any] = {"type": "quantize", "scheme": quant}
        if quant_methods is not None:
            qstep["methods"] = list(quant_methods)
        steps.append(qstep)
    elif quant_methods is not None:
        raise RecipeError("quantizer methods need --quant (a scheme: w8a8, w4a4, ...)")
    if not steps:
        raise RecipeError("nothing to do: give --method (and --ratio) and/or --quant, or --recipe FILE")
    return parse_recipe({"model": model, "calibration": calibration, "steps": steps}, origin="options")


# -- comma-separated flag values -------------------------------------------------------------------


def parse_list(text: str, flag: str) -> list[str]:
    """``"a,b,c"`` → ``["a", "b", "c"]``: empty entries dropped; an empty list or a repeat is an error."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise RecipeError(f"{flag} needs a comma-separated list, got {text!r}")
    if len(set(values)) != len(values):
        raise RecipeError(f"{flag} lists a value twice: {text!r}")
    return values


def check_fraction(value: float, flag: str, meaning: str | None = None) -> float:
    """``value`` if it is in (0, 1]; else an error naming ``flag`` (and what the fraction means)."""
    if not is_fraction(value):
        raise RecipeError(f"{flag}: {value} is outside (0, 1]" + (f"; {meaning}" if meaning else ""))
    return value


def parse_fractions(text: str, flag: str, meaning: str | None = None) -> list[float]:
    """A flag's comma-separated fractions in (0, 1] (ρ1 or ρ2 values), e.g. ``"0.9,0.7,0.5"``."""
    out = []
    for value in parse_list(text, flag):
        try:
            number = float(value)
        except ValueError:
            raise RecipeError(
                f"{flag}: {value!r} is not a number; give fractions in (0, 1], e.g. 0.9,0.5"
            ) from None
        out.append(check_fraction(number, flag, meaning))
    return out


# -- resolution against the registry ----------------------------------------------------------------


def _validate_params(config_class: type[BaseModel], params: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        return config_class.model_validate(params).model_dump(mode="json")
    except ValidationError as err:
        raise RecipeError(f"invalid recipe: {format_validation_error(err, prefix=where)}") from None


def resolve_recipe(recipe: Recipe) -> Recipe:
    """Check names against the registry and fill every method's parameters with its defaults."""

    data = recipe.to_dict()
    for i, step in enumerate(recipe.steps):
        where = f"steps[{i}]"
        if isinstance(step, DecomposeStep):
            cls = get_decomposer(step.method)
            allocation = step.rank_allocation or cls.allocations[0]
            if allocation not in cls.allocations:
                raise RecipeError(
                    f"invalid recipe: {where}.rank_allocation: method {step.method!r} supports "
                    f"{', '.join(cls.allocations)}, got {allocation!r}"
                )
            data["steps"][i]["rank_allocation"] = allocation
            data["steps"][i]["params"] = _validate_params(cls.config_class, step.params, f"{where}.params")
        else:
            try:
                scheme = resolve_scheme(step.scheme)
            except LowRankError as err:
                raise RecipeError(f"invalid recipe: {where}.scheme: {err}") from None
            methods = list(step.methods) if step.methods is not None else list(scheme.methods)
            unknown = [k for k in step.params if k not in methods]
            if unknown:
                raise RecipeError(
                    f"invalid recipe: {where}.params: parameters for {', '.join(unknown)}, which this step "
                    f"does not run (methods: {', '.join(methods)})"
                )
            params = {}
            for name in methods:
                cls = get_quantizer(name)
                params[name] = _validate_params(
                    cls.config_class, step.params.get(name, {}), f"{where}.params.{name}"
                )
            data["steps"][i]["methods"] = methods
            data["steps"][i]["params"] = params
    return parse_recipe(data)
