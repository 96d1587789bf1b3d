"""A request's structured-output fields as one `Grammar`: vLLM's `structured_outputs` (`json`,
`regex`, `choice`, `grammar` as Lark or GBNF, `json_object`) and its older `guided_*` fields,
llama.cpp's `json_schema` and `grammar` (GBNF). At most one may be given (chat's
`response_format` counts too: `Generator.prepare_chat` checks that); each grammar carries the
field it came from, so a bad one is a 400 naming it."""

from __future__ import annotations

from llama_jax import Grammar, InvalidRequestError
from serve.errors import bad_request
from serve.schemas import SamplingFields


def requested_grammar(body: SamplingFields) -> Grammar | None:
    """The grammar the request's fields ask for, or None; a 400 for two of them or a malformed one.
    (Compiling it, which also checks its cost, is `Generator.check_grammar`.)"""
    found = _grammars(body)
    if len(found) > 1:
        names = " and ".join(g.param for g in found if g.param)
        raise bad_request(f"{names} both constrain the output: give one", found[1].param)
    return found[0] if found else None


def _grammars(body: SamplingFields) -> list[Grammar]:
    sources: list = []  # (the field's value, the grammar it makes, the field's name), in order
    so = body.structured_outputs
    if so is not None:
        given = [k for k, v in so.model_dump(by_alias=True).items() if v is not None and v is not False]
        if len(given) > 1:
            raise InvalidRequestError(
                f"structured_outputs takes one of json, regex, choice, grammar, json_object; got {given}",
                param="structured_outputs",
            )
        sources += [
            (so.json_, Grammar.json_schema, "structured_outputs.json"),
            (so.regex, Grammar.regex, "structured_outputs.regex"),
            (so.choice, Grammar.choice, "structured_outputs.choice"),
            (so.grammar, Grammar.cfg, "structured_outputs.grammar"),
            (
                so.json_object or None,
                lambda _, param: Grammar.json_object(param),
                "structured_outputs.json_object",
            ),
        ]
    sources += [
        (body.guided_json, Grammar.json_schema, "guided_json"),
        (body.guided_regex, Grammar.regex, "guided_regex"),
        (body.guided_choice, Grammar.choice, "guided_choice"),
        (body.guided_grammar, Grammar.cfg, "guided_grammar"),
        (body.json_schema, Grammar.json_schema, "json_schema"),
        (body.grammar, Grammar.gbnf, "grammar"),
    ]
    return [make(value, param) for value, make, param in sources if value is not None]
