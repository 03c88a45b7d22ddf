"""math_reward: a table of (completion, gold, expected) cases judged by hand, per extraction mode."""

import pytest

from drpo_trainer.rewards import math_reward

B = r"\boxed"

# Each expected value is the mathematical truth of "final answer == gold", decided by hand.
BOXED_TABLE = [
    # fractions vs decimals
    (B + r"{\frac{1}{2}}", "0.5", 1.0),
    (B + r"{0.5}", r"\frac{1}{2}", 1.0),
    (B + r"{\dfrac{3}{4}}", "0.75", 1.0),
    (B + r"{1/3}", r"\frac{1}{3}", 1.0),
    (B + r"{0.33}", r"\frac{1}{3}", 0.0),  # 0.33 != 0.333333 (math-verify rounds to 6 places)
    (B + r"{\frac{2}{4}}", "1/2", 1.0),  # unreduced fraction
    # roots
    (B + r"{2\sqrt{3}}", r"\sqrt{12}", 1.0),  # sqrt(12) = sqrt(4*3) = 2 sqrt(3)
    (B + r"{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1.0),  # rationalised denominator
    (B + r"{\sqrt{3}}", r"\sqrt{2}", 0.0),
    # intervals
    (B + r"{[1, 2)}", "[1,2)", 1.0),
    (B + r"{(1, 2]}", "[1,2)", 0.0),  # open/closed ends swapped
    (B + r"{(-\infty, 3)}", r"(-\infty,3)", 1.0),
    # sets (order does not matter)
    (B + r"{\{1, 2, 3\}}", r"\{3,2,1\}", 1.0),
    (B + r"{\{1, 2\}}", r"\{1,2,3\}", 0.0),  # missing element
    # tuples (order matters)
    (B + r"{(1, 2, 3)}", "(1,2,3)", 1.0),
    (B + r"{(3, 2, 1)}", "(1,2,3)", 0.0),
    # degrees
    (B + r"{30^\circ}", "30", 1.0),
    (B + r"{30}", r"30^{\circ}", 1.0),
    (B + r"{60^\circ}", "30", 0.0),
    # percents
    (B + r"{50\%}", "50", 1.0),
    (B + r"{25\%}", "50", 0.0),
    # thousands separators
    (B + r"{1,000}", "1000", 1.0),
    (B + r"{12{,}345}", "12345", 1.0),
    (B + r"{1000000}", "1,000,000", 1.0),
    # several boxed answers: the last one is the final answer
    ("First " + B + r"{3}, then corrected: " + B + "{5}", "5", 1.0),
    (B + r"{5} ... on reflection " + B + "{3}", "5", 0.0),
    # nested boxes and braces
    (B + r"{" + B + "{7}}", "7", 1.0),
    (B + r"{\frac{\sqrt{16}}{2}}", "2", 1.0),  # sqrt(16)/2 = 4/2 = 2
    (B + r"{{{42}}}", "42", 1.0),
    # empty box, no box, truncated box
    (B + r"{}", "0", 0.0),
    # an empty final answer is no answer, whatever the gold: text, spaces or math delimiters around nothing
    (B + r"{\text{}}", "0", 0.0),
    (B + r"{\text{}}", "7", 0.0),
    (B + r"{\text{ }}", "12", 0.0),
    (B + r"{\mathrm{}}", "3", 0.0),
    (B + r"{ }", "0", 0.0),
    (B + r"{$$}", "1", 0.0),
    ("The answer is 391.", "391", 0.0),  # boxed mode needs a box
    (B + r"{4} and finally " + B + "{5", "4", 0.0),  # the last box never closed: no final answer
    # sign errors
    (B + r"{-5}", "5", 0.0),
    (B + r"{-\frac{1}{2}}", "-0.5", 1.0),
    (B + r"{\frac{1}{2}}", "-0.5", 0.0),
    # equations
    (B + r"{x=5}", "5", 1.0),
    (B + r"{x = 5}", "x=5", 1.0),
    (B + r"{x=6}", "5", 0.0),
    # other box spellings
    (r"so \boxed 5.", "5", 1.0),
    (r"\fbox{12}", "12", 1.0),
    # gold answers written in LaTeX
    (B + r"{391}", "$391$", 1.0),
    (B + r"{\frac{1}{2}}", B + r"{\frac12}", 1.0),
    # constants, text answers, large integers
    (B + r"{\pi}", r"\pi", 1.0),
    (B + r"{2\pi}", r"\pi", 0.0),
    (B + r"{\text{(B)}}", "B", 1.0),
    (B + r"{123456789}", "123456789", 1.0),
    (B + r"{123456788}", "123456789", 0.0),
    (r"$\boxed{10}$ dollars", "10", 1.0),
]


@pytest.mark.parametrize("completion, answer, expected", BOXED_TABLE)
def test_boxed_table(completion, answer, expected):
    assert math_reward(completion, answer) == expected


def test_table_is_large_and_balanced():
    assert len(BOXED_TABLE) >= 40
    # Both outcomes are well represented, so a reward stuck at 0 or 1 fails many rows.
    assert sum(e == 1.0 for _, _, e in BOXED_TABLE) >= 15
    assert sum(e == 0.0 for _, _, e in BOXED_TABLE) >= 15


@pytest.mark.parametrize(
    "completion, answer, extraction, expected",
    [
        ("Reasoning.\nAnswer: 42", "42", "answer_line", 1.0),
        ("Answer: 4\nWait.\nAnswer: 5", "5", "answer_line", 1.0),  # the last answer line wins
        ("Answer: $\\frac{1}{2}$", "0.5", "answer_line", 1.0),
        ("Answer: 1,000", "1000", "answer_line", 1.0),
        (B + "{5}", "5", "answer_line", 0.0),  # a box is not an answer line
        ("Answer: 5", "5", "boxed", 0.0),  # an answer line is not a box
        (B + "{5}", "5", "auto", 1.0),
        ("Answer: 5", "5", "auto", 1.0),
        (B + "{4}\nAnswer: 5", "5", "auto", 0.0),  # auto prefers the box, which says 4
    ],
)
def test_extraction_modes(completion, answer, extraction, expected):
    assert math_reward(completion, answer, extraction=extraction) == expected


def test_works_off_the_main_thread():
    # math-verify's signal-based timeouts raise ValueError in threads; math_reward must not.
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        got = pool.submit(math_reward, B + r"{\frac{1}{2}}", "0.5").result()
    assert got == 1.0


def test_unknown_extraction_raises():
    with pytest.raises(ValueError, match="reward.extraction"):
        math_reward(B + "{1}", "1", extraction="last")


def test_own_timeout_only_in_the_main_thread_with_no_deadline_armed():
    import signal
    import threading

    from drpo_trainer.rewards.math import _MATH_VERIFY_TIMEOUT_S, _own_timeout_s

    assert _MATH_VERIFY_TIMEOUT_S == 5 and _own_timeout_s() == 5  # main thread, no timer armed
    previous = signal.signal(signal.SIGALRM, lambda *_: None)  # a stray alarm must not kill the test
    try:
        for seconds in (0.9, 30.0):  # an armed caller's deadline, below and above one second
            signal.setitimer(signal.ITIMER_REAL, seconds)
            assert _own_timeout_s() is None
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(_own_timeout_s()))
    thread.start()
    thread.join()
    assert seen == [None]
