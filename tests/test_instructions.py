"""The verifiable instructions of the instruction-following score: every check on answers that
follow it and on answers that do not, and the prompt set."""
import pytest

from forgetkern.demo import instructions as I

CASES = {
    "three_bullets": (["- one\n- two\n- three", "Here:\n* a b\n* c d\n* e f\nThat is all.",
                       "• x\n• y\n• z"],
                      ["- one\n- two", "- a\n- b\n- c\n- d", "one, two, three", "-no space\n- a\n- b"]),
    "json_keys": (['{"title": "Rain", "text": "Wet streets"}',
                   '```json\n{\n  "title": "Moon",\n  "text": "A rock"\n}\n```\nThis is JSON.',
                   '  {"text": "b", "title": "a"}  '],
                  ['{"title": "Rain"}', '{"title": "a", "text": "b", "extra": 1}', '["title", "text"]',
                   'Sure! {"title": "a", "text": "b"}', '```python\nx = {"title": 1}\n```', ""]),
    "max_20_words": (["A short answer.", " ".join(["word"] * 20)],
                     [" ".join(["word"] * 21), "", "   "]),
    "no_commas": (["No commas here. None at all.", "Line one\nLine two"],
                  ["Yes, there is one.", "", "a,b"]),
    "start_sure": (["Sure, here it is.", "sure! fine", '"Sure" I said.'],
                   ["Of course. Sure.", "Surely not.", ""]),
    "title": (["<<A Good Day>>\nIt rained.", "  <<Moon>> is bright"],
              ["A Good Day\nIt rained.", "Text then <<Title>>", "<<>> empty", "<<two\nlines>>"]),
    "one_sentence": (["The moon orbits the Earth.", "What a day!", "Dr Smith's dog is friendly."],
                     ["It rains. It pours.", "No end mark", "One! Two?", ""]),
    "lowercase": (["all lowercase, even 42 digits.", "ok"], ["Not lowercase.", "123 ..."]),
    "uppercase": (["ALL CAPS, 42 TIMES!"], ["Mostly CAPS", "", "..."]),
    "end_done": (["We are done.", "It is DONE!", "finished: done"], ["done? not yet", "Done and dusted.", ""]),
    "quoted": (['"The whole answer."'], ['"Half" the answer.', 'no quotes', '"', '""']),
}


def test_every_instruction_has_cases():
    assert set(CASES) == set(I.INSTRUCTIONS)
    assert set(I.FOLLOWED) <= set(I.INSTRUCTIONS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_checks_accept_followed_and_reject_broken_answers(name):
    good, bad = CASES[name]
    for answer in good:
        assert I.follows(name, answer), (name, answer)
    for answer in bad:
        assert not I.follows(name, answer), (name, answer)


def test_helpers():
    assert I.words("It's 42 o'clock, isn't it?") == ["It's", "42", "o'clock", "isn't", "it"]
    assert I.bullet_lines("- a\n  * b\nc - d\n-") == 2
    assert I.json_object('```\n{"a": 1}\n```') == {"a": 1}
    assert I.json_object("[1]") is None and I.json_object("{") is None
    assert I.sentences("One. Two!  Three?") == ["One.", "Two!", "Three?"]
    assert I.sentences("Version 3.11 is out.") == ["Version 3.11 is out."]


def test_prompts_pair_every_instruction_with_the_first_topics():
    pairs = I.prompts(["no_commas", "title"], 3)
    assert [n for n, _ in pairs] == ["no_commas"] * 3 + ["title"] * 3
    assert pairs[0][1] == f"{I.TOPICS[0]} {I.INSTRUCTIONS['no_commas'].text}"
    assert len({p for _, p in pairs}) == 6
    with pytest.raises(ValueError, match="unknown instructions"):
        I.prompts(["shout"], 2)
    with pytest.raises(ValueError, match="n_topics"):
        I.prompts(["title"], 0)
    with pytest.raises(ValueError, match="n_topics"):
        I.prompts(["title"], len(I.TOPICS) + 1)
