import random
import time

import pytest

from llama_jax.errors import InvalidRequestError
from llama_jax.sampling import SamplingParams
from llama_jax.stopping import DEFAULT_MAX_TOKENS, MAX_STOP_CHARS, StopMatcher, StopRules


def run(stops, deltas):
    m = StopMatcher(stops)
    out = [m.feed(d) for d in deltas]
    return out, m


def test_stop_string_split_across_deltas_is_found_and_excluded():
    out, m = run(["END"], ["hello E", "N", "D and more"])
    assert "".join(out) == "hello "
    assert m.stopped


def test_partial_match_is_held_back_then_released():
    out, m = run(["</s>"], ["a <", "/", "x> b"])
    assert out == ["a ", "", "</x> b"]
    assert not m.stopped and m.flush() == ""


def test_text_held_at_the_end_is_flushed():
    out, m = run(["###"], ["answer #", "#"])
    assert "".join(out) == "answer "
    assert m.flush() == "##"


def test_earliest_of_several_stops_wins():
    out, m = run(["world", "lo w"], ["hello world"])
    assert out == ["hel"]


def test_no_stops_passes_everything_through():
    out, m = run([], ["a", "b"])
    assert out == ["a", "b"] and m.flush() == ""


def reference(stops, deltas):
    """What a stream must show: the text up to the earliest-starting stop found in what has been
    generated so far, each delta holding back any tail that could start a stop."""
    out, text, shown = [], "", 0
    for d in deltas:
        text += d
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            out.append(text[shown : min(hits)])
            return out, True
        hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        safe = max(shown, len(text) - hold)
        out.append(text[shown:safe])
        shown = safe
    return out, False


def test_matches_a_brute_force_reference_on_random_streams():
    rng = random.Random(0)
    for _ in range(2000):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        deltas = ["".join(rng.choices("abc", k=rng.randint(0, 4))) for _ in range(rng.randint(1, 8))]
        out, m = run(stops, deltas)
        want, stopped = reference(stops, deltas)
        assert out[: len(want)] == want and m.stopped == stopped, (stops, deltas)


def test_each_token_costs_time_linear_in_its_text_not_in_the_held_back_text():
    # 15 stops that never match listed before one whose prefix keeps 255 characters held:
    # re-checking every prefix of every stop against the held text each token was quadratic.
    stops = ["b" * 255 + chr(65 + i) for i in range(15)] + ["a" * 255 + "c"]
    m = StopMatcher(stops)
    m.feed("a" * 255)
    start = time.perf_counter()
    for _ in range(5000):
        assert m.feed("a") == "a"
    assert time.perf_counter() - start < 0.25


def test_stop_strings_longer_than_the_cap_in_all_are_refused():
    StopMatcher(["x" * (MAX_STOP_CHARS // 2)] * 2)
    with pytest.raises(InvalidRequestError) as e:
        StopMatcher(["x" * 2000] * 16)
    assert e.value.param == "stop" and str(MAX_STOP_CHARS) in str(e.value)


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["x" * (MAX_STOP_CHARS + 1)]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_invalid_stop_rules_are_rejected_with_the_parameter_named(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        StopRules(**kwargs)
    assert e.value.param == param


def test_stop_rules_take_one_string_and_default_to_the_token_limit():
    rules = StopRules(stop="END", stop_token_ids=[7])
    assert rules.stop == ("END",) and rules.stop_token_ids == (7,)
    assert rules.max_tokens == DEFAULT_MAX_TOKENS and not rules.ignore_eos


def test_token_limits_and_stops_are_not_sampling_values():
    for name in ("max_tokens", "stop", "stop_token_ids", "ignore_eos", "grammar"):
        with pytest.raises(TypeError):
            SamplingParams(**{name: None})
