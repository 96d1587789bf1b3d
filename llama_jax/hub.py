"""Hugging Face model ids to local files, through the optional `huggingface_hub` package
(`pip install 'llama-jax[hf]'`).

`org/name` is a model folder (`config.json`, safetensors, tokenizer) or, for a repository of
GGUF files only, one of them (Q4_K_M when there, as llama.cpp picks); `org/name:Q4_K_M` is the
GGUF file with that quantization tag in its name, as llama.cpp's `-hf` reads it. The local
cache (`HF_HUB_CACHE`, by default ~/.cache/huggingface/hub) is asked first; only what it lacks
is downloaded, and with `HF_HUB_OFFLINE=1` nothing is. `revision` is a branch, tag or commit.
Nothing here reads weights: `weights.py` loads the file or folder returned.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from pathlib import Path
from typing import Any

from llama_jax.errors import ModelLoadError

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.-]+)?")
DEFAULT_QUANT = "Q4_K_M"  # the file llama.cpp's -hf takes from a GGUF repository when none is named
FOLDER_FILES = (  # what a model folder needs (weights.read_hf_folder, Tokenizer.from_hf_folder)
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as `org/name` or `org/name:QUANT`; a path that exists, or that
    names a GGUF file, is a path."""
    if _HUB_ID.fullmatch(name) is None or name.lower().endswith(".gguf"):
        return False
    return not Path(name).expanduser().exists()


def resolve(model_id: str, revision: str | None = None) -> Path:
    """The GGUF file or model folder of a Hugging Face model id, from the cache or downloaded."""
    repo, _, quant = model_id.partition(":")
    hub = _hub(model_id)
    from huggingface_hub import constants  # read at each call: HF_HUB_OFFLINE, HF_HUB_CACHE

    cached = _cached_snapshot(hub, repo, revision)
    if cached is not None:
        found = _pick(_files(cached), quant)
        if found is not None and _complete(cached, found):
            log.info("%s: from the Hugging Face cache, %s", model_id, cached / (found or ""))
            return cached / found if found else cached
    if constants.HF_HUB_OFFLINE:
        what = f"a GGUF file tagged {quant}" if quant else "a model folder or GGUF file"
        where = "has no snapshot of it" if cached is None else f"holds {cached} without it"
        raise ModelLoadError(
            model_id,
            f"HF_HUB_OFFLINE=1 forbids a download, and the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) {where}: {what}" + _at(revision),
        )
    remote = _remote_files(hub, model_id, repo, revision)
    found = _pick(remote, quant)
    if found is None:
        ggufs = _ggufs(remote)
        if quant and ggufs:
            problem = f"no GGUF file tagged {quant} (the repository's GGUF files: {', '.join(ggufs)})"
        else:
            problem = (
                "the repository holds neither a model folder (config.json and *.safetensors) nor "
                f"a GGUF file (files: {', '.join(sorted(remote)[:20]) or 'none'})"
            )
        raise ModelLoadError(model_id, problem + _at(revision))
    log.info("%s: downloading %s", model_id, found or "the model folder")
    try:
        if found:
            return Path(hub.hf_hub_download(repo, found, revision=revision))
        return Path(hub.snapshot_download(repo, revision=revision, allow_patterns=list(FOLDER_FILES)))
    except Exception as e:  # noqa: BLE001 - any failure of the download names the id and the cause
        raise ModelLoadError(model_id, f"download failed{_at(revision)}: {type(e).__name__}: {e}") from e


def _hub(model_id: str) -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ModelLoadError(
            model_id,
            "not a file or folder; as a Hugging Face model id it needs the huggingface_hub package: "
            "pip install 'llama-jax[hf]'",
        ) from None
    return huggingface_hub


def _at(revision: str | None) -> str:
    return f" at revision {revision!r}" if revision else ""


def _cached_snapshot(hub: Any, repo: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of `repo` at `revision`, without any network request."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hub.snapshot_download(repo, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError as e:  # its IncompleteSnapshotError still names the folder
        partial = getattr(e, "snapshot_path", None)
        return Path(partial) if partial else None


def _files(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


def _remote_files(hub: Any, model_id: str, repo: str, revision: str | None) -> list[str]:
    try:
        return list(hub.list_repo_files(repo, revision=revision))
    except Exception as e:  # noqa: BLE001 - not found, gated, no network: the message says which
        raise ModelLoadError(
            model_id,
            f"not in the cache, and the Hugging Face Hub could not list it{_at(revision)}: {type(e).__name__}: {e}",
        ) from e


def _ggufs(files: list[str]) -> list[str]:
    return sorted(f for f in files if f.endswith(".gguf") and "mmproj" not in f.lower())


def _pick(files: list[str], quant: str) -> str | None:
    """What to load from a repository's `files`: "" for the folder itself, a GGUF file's name,
    or None when nothing fits. Of a GGUF split in parts, only the first part would be read:
    such files are not picked."""
    ggufs = [f for f in _ggufs(files) if not re.search(r"-\d{5}-of-\d{5}\.gguf$", f)]
    if not quant:
        if "config.json" in files and any(fnmatch.fnmatch(f, "*.safetensors") for f in files):
            return ""
        return next((f for f in ggufs if _tagged(f, DEFAULT_QUANT)), ggufs[0] if ggufs else None)
    return next((f for f in ggufs if _tagged(f, quant)), None)


def _tagged(filename: str, quant: str) -> bool:
    stem = Path(filename).name.removesuffix(".gguf")
    return re.search(rf"(^|[-._]){re.escape(quant)}($|[-._])", stem, re.IGNORECASE) is not None


def _complete(folder: Path, found: str) -> bool:
    """Whether the cached snapshot holds what `found` needs (a partial download may not)."""
    if found:
        return (folder / found).is_file()
    has = {p.name for p in folder.iterdir()}
    weights = "model.safetensors.index.json" in has or any(n.endswith(".safetensors") for n in has)
    return "config.json" in has and weights and bool({"tokenizer.json", "tokenizer.model"} & has)
