"""A request's structured-output fields as one `Grammar`: vLLM's `structured_outputs` (`json`,
`regex`, `choice`, `grammar` as Lark or GBNF, `json_object`) and its older `guided_*` fields,
llama.cpp's `json_schema` and `grammar` (GBNF). At most one may be given (chat's
`response_format` counts too: `Generator.prepare_chat` checks that); each grammar carries the
field it came from, so a bad one is a 400 naming it."""

from __future__ import annotations

from llama_jax.constrain import Grammar
from llama_jax.errors import InvalidRequestError
from serve.errors import bad_request, from_library
from serve.schemas import SamplingFields


def requested_grammar(body: SamplingFields) -> Grammar | None:
    """The grammar the request's fields ask for, or None; a 400 for two of them or a malformed one.
    (Compiling it, which also checks its cost, is `Generator.check_grammar`.)"""
    try:
        found = _grammars(body)
    except InvalidRequestError as e:
        raise from_library(e) from e
    if len(found) > 1:
        names = " and ".join(g.param for g in found if g.param)
        raise bad_request(f"{names} both constrain the output: give one", found[1].param)
    return found[0] if found else None


def _grammars(body: SamplingFields) -> list[Grammar]:
    found = []
    so = body.structured_outputs
    if so is not None:
        given = [k for k, v in so.model_dump(by_alias=True).items() if v is not None and v is not False]
        if len(given) > 1:
            raise InvalidRequestError(
                f"structured_outputs takes one of json, regex, choice, grammar, json_object; got {given}",
                param="structured_outputs",
            )
        if so.json_ is not None:
            found.append(Grammar.json_schema(so.json_, "structured_outputs.json"))
        if so.regex is not None:
            found.append(Grammar.regex(so.regex, "structured_outputs.regex"))
        if so.choice is not None:
            found.append(Grammar.choice(so.choice, "structured_outputs.choice"))
        if so.grammar is not None:
            found.append(Grammar.cfg(so.grammar, "structured_outputs.grammar"))
        if so.json_object:
            found.append(Grammar.json_object("structured_outputs.json_object"))
    if body.guided_json is not None:
        found.append(Grammar.json_schema(body.guided_json, "guided_json"))
    if body.guided_regex is not None:
        found.append(Grammar.regex(body.guided_regex, "guided_regex"))
    if body.guided_choice is not None:
        found.append(Grammar.choice(body.guided_choice, "guided_choice"))
    if body.guided_grammar is not None:
        found.append(Grammar.cfg(body.guided_grammar, "guided_grammar"))
    if body.json_schema is not None:
        found.append(Grammar.json_schema(body.json_schema, "json_schema"))
    if body.grammar is not None:
        found.append(Grammar.gbnf(body.grammar, "grammar"))
    return found
