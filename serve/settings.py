"""Server settings: frozen dataclasses filled, each level over the one before, from the
defaults, a TOML config file, `LLAMA_JAX_*` environment variables and `llama-jax serve` flags
(`load`; `hypercorn serve.app:app` has no flags, otherwise the same).

One `ModelSpec` per served model; the top-level `model`/`aliases`/`max_slots`/... fields
describe the single model of the simple case and are the defaults of every `[[models]]` entry
of a config file:

    # llama-jax.toml
    api_keys = ["sk-team-a", "sk-team-b"]
    rate_limit_rpm = 60          # per key (or per client address without keys); 0: off
    rate_limit_tpm = 20000
    memory_budget_mb = 4096      # a load that would not fit is refused (503), nothing else moves

    [[models]]
    model = "smollm2-135m-instruct"
    aliases = ["default"]
    max_slots = 8

    [[models]]
    model = "./Qwen2-0.5B-Instruct-Q8_0.gguf"
    quantize = "int8"
    lazy = true                  # loaded on first use ...
    idle_unload_s = 600          # ... and unloaded after 10 idle minutes

    [rate_limits."sk-team-b"]    # per-key overrides
    rpm = 600
    tpm = 200000
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llama_jax import WARMUP_MODES, LoadOptions

PREFIX = "LLAMA_JAX_"
REASONING_FORMATS = ("auto", "deepseek", "none")


@dataclasses.dataclass(frozen=True)
class ModelSpec(LoadOptions):
    """One served model: its load options (`llama_jax.LoadOptions`: dtype, quantize, slots,
    sequence length, mesh, ...) and how the server offers it."""

    model: str | None = None  # alias, GGUF file, Hugging Face folder or model id; None: the default
    aliases: tuple[str, ...] = ()  # extra names the model answers to
    max_queue: int = 256
    lazy: bool = False  # load on the first request instead of at start
    idle_unload_s: float = 0.0  # unload after this many idle seconds (0: never)


@dataclasses.dataclass(frozen=True)
class RateLimit:
    rpm: int = 0  # requests per minute; 0: unlimited
    tpm: int = 0  # tokens (prompt + max_tokens, settled to actual use) per minute; 0: unlimited


@dataclasses.dataclass(frozen=True)
class Settings:
    # The single-model case (and the defaults of a config file's [[models]]): `ModelSpec`'s
    # fields, with its defaults.
    model: str | None = None
    revision: str | None = LoadOptions.revision
    aliases: tuple[str, ...] = ()
    max_slots: int = LoadOptions.max_slots
    max_seq_len: int = LoadOptions.max_seq_len
    dtype: str = LoadOptions.dtype
    quantize: str | None = LoadOptions.quantize
    max_queue: int = ModelSpec.max_queue
    chat_template: str | None = LoadOptions.chat_template
    mesh: str | None = LoadOptions.mesh
    # Several models: when set, these replace the single model above.
    models: tuple[ModelSpec, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8080
    ssl_certfile: str | None = None  # with ssl_keyfile: `llama-jax serve` speaks https
    ssl_keyfile: str | None = None
    # "first": serve once a first request's steps are compiled, compile the rest meanwhile;
    # "full": compile every step before /health says ok; "none": each step when first needed.
    # true/false (older configs) are "full"/"none".
    warmup: str = "first"
    max_body_bytes: int = 8 * 1024 * 1024
    memory_budget_mb: int = 0  # weights + KV caches of the loaded models; 0: unlimited
    compilation_cache: str | None = "default"
    api_keys: tuple[str, ...] = ()
    rate_limit_rpm: int = 0
    rate_limit_tpm: int = 0
    rate_limits: Mapping[str, RateLimit] = dataclasses.field(default_factory=dict)  # per key
    cors_origins: tuple[str, ...] = ()
    webui: bool = True
    stall_timeout_s: int = 60  # /health says "stalled" when an engine has work but no step ends for this long
    # With one model, a request naming any model is answered by it (llama.cpp's way, so clients
    # with a hard-coded name work); strict: only its id and aliases. Several models are always strict.
    strict_model_names: bool = False
    # "auto" (or llama.cpp's "deepseek"): a reasoning block goes to `reasoning_content`; "none": inline
    reasoning_format: str = "auto"
    config: str | None = None  # the TOML file these settings came from, if any

    def __post_init__(self):
        if self.reasoning_format not in REASONING_FORMATS:
            raise ValueError(f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}")
        object.__setattr__(self, "warmup", warmup_mode(self.warmup))

    def model_specs(self) -> tuple[ModelSpec, ...]:
        if self.models:
            return self.models
        names = {f.name for f in dataclasses.fields(ModelSpec)}
        return (ModelSpec(**{k: v for k, v in dataclasses.asdict(self).items() if k in names}),)

    def rate_limit(self, key: str | None) -> RateLimit:
        if key is not None and key in self.rate_limits:
            return self.rate_limits[key]
        return RateLimit(self.rate_limit_rpm, self.rate_limit_tpm)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """What `hypercorn serve.app:app` serves: `load` without flags."""
        return load(environ=environ)

    def over(self, values: Mapping[str, Any]) -> Settings:
        """These settings with `values` (setting names; absent means "not given") laid over them.

        `model` (a tuple of names) replaces the list of models, each new one taking the
        top-level defaults; a model setting such as `max_slots` applies to every model;
        `aliases` are `NAME` (the first model's) or `MODEL_ID=NAME`. Any other value replaces
        the one below it, lists included."""
        values = dict(values)
        names = values.pop("model", None)
        aliases = values.pop("aliases", None)
        shared = {k: values[k] for k in _SHARED if k in values}
        top = dataclasses.replace(self, **values)
        if names is not None:
            defaults = {k: getattr(top, k) for k in _SHARED}
            specs = [ModelSpec(model=m, **defaults) for m in names]
        else:
            specs = [dataclasses.replace(s, **shared) for s in self.model_specs()]
        if aliases is not None:
            specs = _assign_aliases(specs, aliases)
        if len(specs) == 1 and not self.models:  # the simple case stays in the top-level fields
            only = {k: v for k, v in dataclasses.asdict(specs[0]).items() if hasattr(top, k)}
            return dataclasses.replace(top, **only, models=())
        return dataclasses.replace(top, models=tuple(specs))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Settings:
        """Settings from a TOML file (see the module docstring); unknown keys are errors."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{path}: {e}") from None
        known = {f.name for f in dataclasses.fields(cls)} - {"config"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        values: dict[str, Any] = {"config": str(path)}
        for k, v in data.items():
            if k == "models":
                values[k] = tuple(_model_spec(path, data, m) for m in v)
            elif k == "rate_limits":
                values[k] = {key: RateLimit(**limits) for key, limits in v.items()}
            elif isinstance(v, list):
                values[k] = tuple(v)
            else:
                values[k] = v
        return cls(**values)


_ENV_NAMES = {"aliases": "ALIAS", "cors_origins": "CORS_ORIGINS"}
# Settings of each model that may also be given once for all (top level, variable or flag).
_SHARED = tuple(
    f.name
    for f in dataclasses.fields(ModelSpec)
    if f.name not in ("model", "aliases") and hasattr(Settings, f.name)
)


def load(
    config: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """The server's settings, each level over the one before: the defaults, the config file
    (`config`, else `LLAMA_JAX_CONFIG`), the `LLAMA_JAX_*` variables, then `flags` (setting
    names, as for `Settings.over`). `llama-jax serve` and `hypercorn serve.app:app` both
    come here, so a deployment reads the same whichever way it starts."""
    env = os.environ if environ is None else environ
    path = config or env.get(PREFIX + "CONFIG") or None
    base = Settings.from_file(path) if path else Settings()
    return base.over(env_values(env)).over(flags or {})


def env_values(env: Mapping[str, str]) -> dict[str, Any]:
    """The settings that `LLAMA_JAX_*` variables give (an empty variable gives none)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        if f.name in ("models", "rate_limits", "config"):
            continue
        key = PREFIX + _ENV_NAMES.get(f.name, f.name.upper())
        raw = env.get(key)
        if raw is None or raw == "":
            continue
        try:
            values[f.name] = _parse(f.name, raw)
        except ValueError as e:
            raise ValueError(f"{key}={raw!r}: {e}") from None
    if "model" in values:
        values["model"] = (values["model"],)
    if env.get(PREFIX + "API_KEY_FILE"):
        values["api_keys"] = values.get("api_keys", ()) + read_key_file(env[PREFIX + "API_KEY_FILE"])
    return values


def _assign_aliases(specs: list[ModelSpec], aliases: tuple[str, ...]) -> list[ModelSpec]:
    """`NAME` belongs to the first model, `MODEL_ID=NAME` to the model with that id; a model
    no alias names keeps its own."""
    targeted: dict[int, list[str]] = {}
    ids: list[str] | None = None
    for a in aliases:
        name, sep, alias = a.partition("=")
        if not sep:
            targeted.setdefault(0, []).append(a)
            continue
        if ids is None:
            from serve.state import model_id  # serve.state imports this module

            ids = [model_id(s.model) for s in specs]
        if name not in ids:
            raise ValueError(f"alias {a}: no model called {name!r} (models: {', '.join(ids)})")
        targeted.setdefault(ids.index(name), []).append(alias)
    return [dataclasses.replace(s, aliases=tuple(targeted.get(i, s.aliases))) for i, s in enumerate(specs)]


def _model_spec(path: object, data: Mapping[str, Any], entry: Mapping[str, Any]) -> ModelSpec:
    names = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = set(entry) - names
    if unknown:
        raise ValueError(f"{path}: unknown model settings {sorted(unknown)}")
    defaults = {k: data[k] for k in names if k in data and k not in ("model", "aliases")}
    spec = {**defaults, **entry}
    if "aliases" in spec:
        spec["aliases"] = tuple(spec["aliases"])
    return ModelSpec(**spec)


def read_key_file(path: str | os.PathLike) -> tuple[str, ...]:
    """API keys, one per line (blank lines and `#` comments ignored)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"API key file {path}: {e.strerror}") from None
    return tuple(s for line in lines if (s := line.strip()) and not s.startswith("#"))


def warmup_mode(value: str | bool) -> str:
    """ "full", "first" or "none", from a mode or a yes/no value (yes: "full", as before modes)."""
    if isinstance(value, bool):
        return "full" if value else "none"
    v = str(value).lower()
    if v in WARMUP_MODES:
        return v
    if v in ("1", "true", "yes", "on"):
        return "full"
    if v in ("0", "false", "no", "off"):
        return "none"
    raise ValueError(f"expected full, first or none, got {value!r}")


def _parse(name: str, raw: str):
    default = getattr(Settings, name, None)
    if name == "warmup":
        return warmup_mode(raw)
    if name in ("aliases", "api_keys", "cors_origins"):
        return tuple(a.strip() for a in raw.split(",") if a.strip())
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if isinstance(default, int):
        return int(raw)
    if name in ("quantize", "compilation_cache", "mesh") and raw.lower() in ("none", "off"):
        return None
    return raw
