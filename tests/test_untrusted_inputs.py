"""Caps on untrusted text at the HTTP boundary: each over-large input is a 400 naming its field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llama_jax.stopping import MAX_STOP_CHARS
from serve.errors import from_validation
from serve.schemas import ChatCompletionRequest, CompletionRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def refusal(schema, body):
    with pytest.raises(ValidationError) as e:
        schema.model_validate(body)
    return from_validation(e.value)


@pytest.mark.parametrize("stop", [["x" * 2000] * 16, "y" * (MAX_STOP_CHARS + 1)])
def test_stop_strings_over_the_total_cap_are_a_400_naming_stop(stop):
    err = refusal(ChatCompletionRequest, {**CHAT, "stop": stop})
    assert err.status == 400 and err.param == "stop" and str(MAX_STOP_CHARS) in str(err)
    err = refusal(CompletionRequest, {"model": "m", "prompt": "p", "stop": stop})
    assert err.param == "stop"
    ChatCompletionRequest.model_validate({**CHAT, "stop": ["x" * (MAX_STOP_CHARS // 2)] * 2})
