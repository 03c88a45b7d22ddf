"""Final-answer extraction: last box wins, nesting, escapes, truncation, answer lines, auto mode."""

import pytest

from drpo_trainer.rewards.extract import answer_line, extract_final_answer, last_boxed, normalize_gold


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{3} then \boxed{5}", "5"),  # the last box is the final answer
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces kept whole
        (r"so \boxed 5.", "5"),  # brace-less argument, sentence period dropped
        (r"\boxed   {7}", "7"),  # whitespace before the group
        (r"\fbox{12}", "12"),
        (r"\boxed{\boxed{7}}", "7"),  # nested box unwrapped
        (r"\boxed{x = \boxed{4} + 1}", "x = 4 + 1"),  # a box inside the content loses its wrapper only
        (r"\boxed{x = \boxed{\frac{1}{2}}}", r"x = \frac{1}{2}"),  # plain braces inside an inner box stay
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are literal, not grouping
        (r"\boxed{2} and \boxedfoo{3}", "2"),  # \boxedfoo is another macro
        (r"\boxed{}", None),  # empty box: no answer
        (r"\boxed{4} finally \boxed{5", None),  # truncated last box: the earlier one was a draft
        ("no box here, the answer is 5", None),
        (r"$\boxed{10}$ dollars", "10"),
        (r"\boxed{\text{(B)}}", r"\text{(B)}"),
        (r"\\boxed{9}", None),  # a LaTeX line break followed by the word 'boxed' is not a box
    ],
)
def test_last_boxed(text, expected):
    assert extract_final_answer(text, "boxed") == expected


def test_last_top_level_box_contains_nested_ones():
    # The top-level boxes are {1} and {\boxed{2} + \boxed{3}}; the last one wins and is unwrapped.
    assert last_boxed(r"\boxed{1}. Then \boxed{\boxed{2} + \boxed{3}}") == "2 + 3"


def test_deep_nesting_and_long_text_are_handled_whole():
    depth = 5000
    text = r"\boxed{" + "{" * depth + "1" + "}" * depth + "}"
    assert last_boxed(text) == "{" * depth + "1" + "}" * depth
    boxes = r"\boxed{1}" * 10000 + r"\boxed{2}"  # 100,010 characters, 10,001 boxes
    assert last_boxed(boxes) == "2"
    assert last_boxed("{" * 100_000) is None  # no box at all
    assert last_boxed(r"\boxed{" + "{" * 100_000) is None  # never closed


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Answer: 4\nmore text\nlast line", "4"),  # only the rest of its own line
        ("Answer: $4.$", "4"),  # a period inside the math delimiters is dropped too
        ("Answer: MAX.", "MAX"),  # only periods are stripped, not other letters
        ("Answer: $\\(4\\)$", "4"),  # nested delimiters are all stripped
        ("Answer: $$", None),  # an empty display-math pair
        ("Answer: 5$", "5$"),  # nor is a trailing one
        ("Reasoning.\nAnswer: 42", "42"),
        ("Answer: 4\nWait, no.\nAnswer: 5\n", "5"),  # the last answer line wins
        ("answer:  $\\frac{1}{2}$.", "\\frac{1}{2}"),  # case-insensitive; $ and final period stripped
        ("Answer: \\boxed{7}.", "7"),  # a box on the line wins
        ("Answer:\nnothing on the line", None),
        ("The answer is 5", None),  # DAPO format needs the colon
    ],
)
def test_answer_line(text, expected):
    assert answer_line(text) == expected
    assert extract_final_answer(text, "answer_line") == expected


def test_a_lone_dollar_is_the_line_but_no_answer():
    assert answer_line("Answer: $") == "$"  # a lone dollar is not a math pair: the line is kept as written
    assert extract_final_answer("Answer: $", "answer_line") is None  # but a math delimiter alone says nothing


def test_auto_prefers_box_then_answer_line():
    assert extract_final_answer(r"\boxed{4}" + "\nAnswer: 5", "auto") == "4"
    assert extract_final_answer("Answer: 5", "auto") == "5"
    assert extract_final_answer(r"\boxed{4}", "answer_line") is None
    assert extract_final_answer("nothing", "auto") is None


def test_unknown_mode_names_the_valid_ones():
    with pytest.raises(ValueError, match="boxed, answer_line, auto"):
        extract_final_answer(r"\boxed{1}", "first_box")


@pytest.mark.parametrize(
    "gold, expected",
    [("391", "391"), ("$\\frac{1}{2}$", "\\frac{1}{2}"), ("\\boxed{2}", "2"), ("\\(x=5\\)", "x=5"), (" 1/2 ", "1/2")],
)
def test_normalize_gold(gold, expected):
    assert normalize_gold(gold) == expected


def test_default_extraction_is_the_last_box():
    assert extract_final_answer(r"Answer: 1. \boxed{3}") == "3"
