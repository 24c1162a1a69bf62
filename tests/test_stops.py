import random

import pytest

from miaotui.engine.stops import StopChecker


def run(stops, deltas):
    """Feed deltas until a stop; return (emitted text, stopped, per-call outputs)."""
    sc = StopChecker(stops)
    outs = []
    for d in deltas:
        text, stopped = sc.feed(d)
        outs.append(text)
        if stopped:
            return "".join(outs), True, outs
    outs.append(sc.flush())
    return "".join(outs), False, outs


def reference(stops, deltas):
    """Stop at the first delta after which some stop string occurs; cut at its earliest start."""
    seen = ""
    for d in deltas:
        seen += d
        hits = [seen.find(s) for s in stops if seen.find(s) >= 0]
        if hits:
            return seen[: min(hits)], True
    return seen, False


def test_exact_cut_in_one_delta():
    assert run(["</s>"], ["Hello</s>world"])[:2] == ("Hello", True)
    assert run(["</s>"], ["</s>"])[:2] == ("", True)


def test_stop_split_across_deltas_is_never_partly_emitted():
    text, stopped, outs = run(["<|end|>"], ["Hi <", "|e", "nd", "|> tail"])
    assert (text, stopped) == ("Hi ", True)
    assert outs == ["Hi ", "", "", ""]


def test_false_alarm_is_released_once_it_cannot_match():
    sc = StopChecker(["STOP"])
    assert sc.feed("a ST") == ("a ", False)
    assert sc.feed("ART") == ("START", False)


def test_earliest_stop_wins():
    assert run(["world", "lo"], ["Hello world"])[:2] == ("Hel", True)
    assert run(["b", "abc"], ["xxabc"])[:2] == ("xx", True)  # both in view: earliest start wins
    assert run(["b", "abc"], list("xxabc"))[:2] == ("xxa", True)  # "b" completes first, ending it
    sc = StopChecker(["A", "B"])
    assert sc.feed("xxBA") == ("xx", True) and sc.matched == "B"


def test_no_stop_flush_returns_held_text():
    sc = StopChecker(["</s>", "###"])
    assert sc.feed("answer </") == ("answer ", False)
    assert sc.feed("#") == ("</", False)
    assert sc.flush() == "#"
    assert sc.flush() == ""
    assert not sc.stopped and sc.matched is None


def test_overlapping_prefixes():
    # "abab" inside "abaabab": the held "aba" turns out not to start a match, the later one does
    text, stopped, outs = run(["abab"], ["aba", "a", "bab"])
    assert (text, stopped) == ("aba", True)
    assert outs == ["", "aba", ""]
    assert run(["aab"], ["aaaa", "ab"])[:2] == ("aaa", True)


def test_after_stop_everything_is_dropped():
    sc = StopChecker(["x"])
    assert sc.feed("axb") == ("a", True)
    assert sc.feed("more") == ("", True)
    assert sc.flush() == ""


def test_no_stop_strings_passes_through():
    sc = StopChecker([])
    assert sc.feed("abc") == ("abc", False)
    assert StopChecker([""]).feed("abc") == ("abc", False)  # an empty stop string is ignored


@pytest.mark.parametrize("seed", range(5))
def test_random_splits_match_reference(seed):
    rng = random.Random(seed)
    for _ in range(300):
        full = "".join(rng.choices("ab<>/s ", k=rng.randint(0, 30)))
        stops = rng.sample(["</s>", "ab", "aab", "<>", "bba", "s s", "/"], k=rng.randint(1, 3))
        cuts = sorted(rng.sample(range(len(full) + 1), k=min(len(full) + 1, rng.randint(0, 6))))
        deltas = [full[i:j] for i, j in zip([0, *cuts], [*cuts, len(full)])]
        text, stopped, outs = run(stops, deltas)
        assert (text, stopped) == reference(stops, deltas)
        # after each delta, only the longest tail that could still start a stop string is held back
        emitted, seen = "", ""
        for d, out in zip(deltas, outs):
            emitted, seen = emitted + out, seen + d
            if not any(stop in seen for stop in stops):
                held = max((k for st in stops for k in range(len(st)) if seen.endswith(st[:k])), default=0)
                assert emitted == seen[: len(seen) - held]
