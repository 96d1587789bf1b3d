"""Tests for llama_jax/hub.py: Hugging Face model ids resolved offline, from a cache folder the
test builds in the layout `huggingface_hub` reads (no network: `HF_HUB_OFFLINE` is on)."""

from __future__ import annotations

import sys

import huggingface_hub
import pytest
from huggingface_hub import constants
from tiny import random_tensors, tiny_config, write_gguf, write_hf_folder, write_hub_cache

from llama_jax import Generator, SamplingParams
from llama_jax.errors import ModelLoadError
from llama_jax.weights import resolve_model_path

CHAT, GGUF = "tiny-org/tiny-chat", "tiny-org/tiny-chat-GGUF"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache holding CHAT as a safetensors folder (main, and a `v2` tag with other weights)
    and GGUF as a repository of two quantizations (and a projector to be ignored)."""
    d = tmp_path_factory.mktemp("hub")
    cfg = tiny_config()
    write_hub_cache(d / "cache", CHAT, write_hf_folder(d / "chat", cfg, random_tensors(cfg)))
    write_hub_cache(d / "cache", CHAT, write_hf_folder(d / "chat2", cfg, random_tensors(cfg, seed=1)), "v2")
    ggufs = d / "ggufs"
    ggufs.mkdir()
    for name in ("tiny-chat-Q8_0.gguf", "tiny-chat-Q4_K_M.gguf", "mmproj-tiny-chat-f16.gguf"):
        write_gguf(ggufs / name, cfg, random_tensors(cfg))
    write_hub_cache(d / "cache", GGUF, ggufs)
    return d / "cache"


@pytest.fixture
def offline(cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_model_id_loads_its_cached_folder_and_generates(offline):
    gen = Generator.from_pretrained(CHAT, max_seq_len=64, max_slots=1, compilation_cache=None)
    try:
        assert gen.loaded.name == CHAT
        assert gen.loaded.path.parent.name == "snapshots" and gen.loaded.path.is_dir()
        out = gen.generate(["hi"], SamplingParams(temperature=0), max_tokens=3, ignore_eos=True)[0]
        assert out.usage.completion_tokens == 3
    finally:
        gen.close()


def test_revision_picks_the_snapshot_its_ref_names(offline):
    _, main = resolve_model_path(CHAT)
    _, v2 = resolve_model_path(CHAT, revision="v2")
    assert main != v2 and main.parent == v2.parent
    assert (main / "model.safetensors").read_bytes() != (v2 / "model.safetensors").read_bytes()


def test_a_gguf_repository_gives_the_file_of_the_tag_or_q4_k_m(offline):
    assert resolve_model_path(GGUF + ":Q8_0")[1].name == "tiny-chat-Q8_0.gguf"
    assert resolve_model_path(GGUF + ":q8_0")[1].name == "tiny-chat-Q8_0.gguf"  # as llama.cpp: any case
    assert resolve_model_path(GGUF)[1].name == "tiny-chat-Q4_K_M.gguf"  # llama.cpp's default pick
    name, path = resolve_model_path(GGUF + ":Q4_K_M")
    assert name == GGUF + ":Q4_K_M" and path.is_file()


@pytest.mark.parametrize(
    ("model", "revision", "words"),
    [
        (GGUF + ":Q5_K_M", None, ["tagged Q5_K_M", "HF_HUB_OFFLINE=1"]),
        ("tiny-org/absent", None, ["no snapshot", "HF_HUB_OFFLINE=1"]),
        (CHAT, "v9", ["no snapshot", "revision 'v9'"]),
    ],
)
def test_what_the_offline_cache_lacks_is_a_clear_error(offline, model, revision, words):
    with pytest.raises(ModelLoadError) as e:
        resolve_model_path(model, revision)
    assert str(e.value).startswith(model + ": ") and str(offline) in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_online_a_missing_file_is_listed_and_downloaded(cache, monkeypatch, tmp_path):
    """Online, what the cache lacks comes from the Hub: listed, the tag's file picked, fetched."""
    fetched = []
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(
        huggingface_hub, "list_repo_files", lambda repo, revision=None: ["README.md", "x-Q6_K.gguf"]
    )

    def download(repo, filename, revision=None):
        fetched.append((repo, filename, revision))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert resolve_model_path(GGUF + ":Q6_K", "main")[1] == tmp_path / "x-Q6_K.gguf"
    assert fetched == [(GGUF, "x-Q6_K.gguf", "main")]
    with pytest.raises(
        ModelLoadError, match=r"no GGUF file tagged IQ2_XS \(the repository's GGUF files: x-Q6_K"
    ):
        resolve_model_path(GGUF + ":IQ2_XS")


def test_without_huggingface_hub_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ModelLoadError, match=r"tiny-org/x: .*pip install 'llama-jax\[hf\]'"):
        resolve_model_path("tiny-org/x")


def test_paths_and_aliases_are_not_taken_for_model_ids(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        resolve_model_path("models/absent.gguf")  # a GGUF path, however it reads
    assert resolve_model_path("smollm2-135m-instruct")[1].suffix == ".gguf"
