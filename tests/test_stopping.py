from llama_jax.stopping import StopMatcher


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
