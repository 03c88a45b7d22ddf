"""What an answer says, read before math-verify compares it (standard library only).

Owns the rules of docs/rewards.md, "What scores and what does not", that math-verify does not
apply by itself:

- ``unicode_form``: Unicode spellings of digits and invisible characters made plain (NFKC, any
  decimal digit to ASCII, format characters such as U+200B removed), without letting NFKC turn
  ``x²`` into ``x2`` or ``3½`` into ``31⁄2``.
- ``is_blank``: an answer with nothing in it (``\\text{}``, ``{}``, spacing commands only).
- ``split_relation``: whether an answer is a *value* (``5``, or ``x = 5`` read as ``5``) or a
  *statement* (``7 = 5``, ``a \\to b``, ``x < 5``, ``1=2=3``).
- ``split_percent``: a trailing percent sign, which is a unit: ``5\\%`` is the number 5.
- ``scientific_to_latex``: ``1e20`` as ``1\\times10^{20}``, so that math-verify never reads it
  as Euler's e plus 20.
- ``plain_text``: the spelling-insensitive text used where only an exact match can be trusted.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Optional

# --- Unicode ----------------------------------------------------------------------------------

_ARABIC_SEPARATORS = {"\u066b": ".", "\u066c": ","}  # Arabic decimal and thousands separators


def _compat_rewrite(ch: str) -> Optional[str]:
    """LaTeX for a character whose NFKC form would change its meaning, else None."""
    decomposition = unicodedata.decomposition(ch)
    if not decomposition.startswith(("<super>", "<sub>", "<fraction>")):
        return None
    plain = unicodedata.normalize("NFKC", ch)
    if decomposition.startswith("<super>"):
        return "^{" + plain + "}"
    if decomposition.startswith("<sub>"):
        return "_{" + plain + "}"
    top, _, bottom = plain.partition("\u2044")  # '½' -> '1⁄2'
    return "\\frac{" + top + "}{" + bottom + "}" if bottom else plain


def unicode_form(text: str) -> str:
    """`text` with invisible format characters removed, superscripts/subscripts/vulgar fractions
    written in LaTeX, then NFKC (fullwidth ``５`` -> ``5``) and every decimal digit in ASCII
    (Arabic-Indic ``٥`` -> ``5``)."""
    out = []
    for ch in text:
        if ch.isascii():
            out.append(ch)
            continue
        category = unicodedata.category(ch)
        if category == "Cf":  # zero-width space/joiners, BOM, soft hyphen, bidi controls
            continue
        if category == "Nd":
            out.append(str(unicodedata.decimal(ch)))
            continue
        out.append(_ARABIC_SEPARATORS.get(ch) or _compat_rewrite(ch) or ch)
    return unicodedata.normalize("NFKC", "".join(out))


# --- blank answers ----------------------------------------------------------------------------

_SPACING = re.compile(r"\\[,;:! ]|\\(?:quad|qquad|enspace|thinspace|medspace|thickspace|displaystyle)(?![A-Za-z])|~|\s")
_EMPTY_GROUP = re.compile(r"(?:\\(?:text|textrm|textbf|textit|mathrm|mathbf|mathit|mbox|operatorname)\s*)?\{\}")
_MATH_DOLLARS = re.compile(r"\$")


def is_blank(answer: str) -> bool:
    """True when `answer` holds nothing but spacing, ``$`` and empty groups (``\\text{}``, ``{ }``)."""
    s = _MATH_DOLLARS.sub("", _SPACING.sub("", unicode_form(answer)))
    while True:
        shorter = _EMPTY_GROUP.sub("", s)
        if shorter == s:
            return not s
        s = shorter


# --- relations --------------------------------------------------------------------------------

_RELATION_NAMES = frozenset(
    """to gets mapsto longmapsto implies impliedby iff equiv sim nsim cong ncong approx in notin ni owns
    subset supset sqsubset sqsupset Subset Supset propto parallel nparallel perp mid nmid shortmid vdash dashv
    models vDash Vdash VDash le ge ne lt gt ll gg lll ggg lesssim gtrsim lessgtr gtrless lessapprox gtrapprox
    nless ngtr prec succ nprec nsucc precsim succsim precapprox succapprox asymp bowtie colon not therefore
    because land lor lnot neg smile frown between pitchfork backsim thicksim thickapprox vartriangleleft
    vartriangleright trianglelefteq trianglerighteq ntriangleleft ntriangleright""".split()
)
# ASCII relations, longest first: ':=' is one relation, '->' is an arrow, not a minus.
_ASCII_RELATION = re.compile(r"<=>|<->|:=|=:|==|<=|>=|!=|=>|->|<-|[=<>]")
_TOKEN = re.compile(r"\\([A-Za-z]+)|\\.|[{}()\[\]]|<=>|<->|:=|=:|==|<=|>=|!=|=>|->|<-|[=<>]|[^\x00-\x7f]", re.S)
_RELATION_RANGES = (
    (0x2190, 0x21FF),  # arrows
    (0x2208, 0x220D),  # element of
    (0x221D, 0x221D),  # proportional to
    (0x2223, 0x2226),  # divides, parallel
    (0x2234, 0x2235),  # therefore, because
    (0x223C, 0x223D),  # tilde operator
    (0x2241, 0x228B),  # equivalences, inequalities, subsets
    (0x228F, 0x2292),
    (0x22A2, 0x22AF),  # turnstiles, perpendicular
    (0x22B0, 0x22B7),
    (0x22D0, 0x22ED),
    (0x27F0, 0x27FF),  # long arrows
    (0x2900, 0x297F),
    (0x2A66, 0x2AFA),  # slanted inequalities and friends
)
_VALUE_RELATIONS = frozenset({"=", "in"})  # `x = 5` and `x \in [1, 2]` give their right-hand side
_GREEK = (
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi pi varpi rho "
    "varrho sigma varsigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Pi Sigma Upsilon Phi "
    "Psi Omega"
)
_SINGLE_VARIABLE = re.compile(
    r"(?:[A-Za-z]|\\(?:" + "|".join(_GREEK.split()) + r"))(?:_(?:[A-Za-z0-9]|\{[A-Za-z0-9]+\}))?'*"
)


def _is_relation_name(name: str) -> bool:
    low = name.lower()
    if low.startswith(("over", "under")):  # accents and labels: \overrightarrow{AB} is a vector
        return False
    return (
        name in _RELATION_NAMES
        or "arrow" in low
        or "harpoon" in low
        or low.startswith("eq")
        or low.endswith(("eq", "eqq", "eqslant"))
        or (low.startswith("n") and name[1:] in _RELATION_NAMES)
    )


def _is_relation_char(ch: str) -> bool:
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in _RELATION_RANGES)


def _relations(text: str) -> list[tuple[str, int, int, int]]:
    """Every relation in `text`: (relation, brace/bracket depth, start, end)."""
    found = []
    depth = 0
    for m in _TOKEN.finditer(text):
        token, name = m.group(), m.group(1)
        if token in "{([":
            depth += 1
        elif token in "})]":
            depth = max(0, depth - 1)
        elif name is not None:
            if _is_relation_name(name):
                found.append((name, depth, m.start(), m.end()))
        elif _ASCII_RELATION.fullmatch(token) or (len(token) == 1 and not token.isascii() and _is_relation_char(token)):
            found.append((token, depth, m.start(), m.end()))
    return found


def split_relation(answer: str) -> tuple[str, str]:
    """('value', text) or ('statement', answer).

    An answer with no relation is a value. ``v = E`` or ``v \\in E``, where ``v`` is a single
    variable (a letter or Greek letter, optionally with a one-token subscript and primes) and the
    relation is the only one in the answer, is the value ``E``. Anything else with a relation in
    it (at any depth, inside ``\\text{}`` too) is a statement.
    """
    found = _relations(answer)
    if not found:
        return "value", answer
    if len(found) == 1:
        relation, depth, start, end = found[0]
        left, right = answer[:start].strip(), answer[end:].strip()
        if depth == 0 and relation in _VALUE_RELATIONS and right and _SINGLE_VARIABLE.fullmatch(left.replace(" ", "")):
            return "value", right
    return "statement", answer


# --- percent ----------------------------------------------------------------------------------

_TRAILING_PERCENT = re.compile(
    r"(?:\\?%|\\(?:text|textrm|mathrm|mbox)\s*\{\s*(?:\\?%|percent|pct)\s*\}|(?<![A-Za-z])(?:percent|pct))"
    r"(?:\s|\\[,;:! ]|~)*$",
    re.IGNORECASE,
)
_ANY_PERCENT = re.compile(r"%|percent|pct", re.IGNORECASE)


def split_percent(value: str) -> tuple[str, bool]:
    """(value without its trailing percent sign, whether a percent sign is left elsewhere).

    ``5\\%``, ``5 %``, ``5\\text{ percent}`` all give ``5``: the percent sign is a unit and is
    dropped, not a factor of 1/100.
    """
    stripped = _TRAILING_PERCENT.sub("", value).rstrip()
    if stripped.endswith(("\\,", "\\;", "\\!", "\\:", "\\ ")):
        stripped = stripped[:-2].rstrip()
    return stripped, bool(_ANY_PERCENT.search(stripped))


# --- scientific notation ----------------------------------------------------------------------

_SCIENTIFIC = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))[eE]([+-]?)(\d+)")


def scientific_to_latex(value: str) -> str:
    """``1e20`` / ``2.5E-3`` / ``1e+20`` (the whole answer, no spaces) as ``m\\times10^{k}``; else `value`."""
    m = _SCIENTIFIC.fullmatch(value.strip())
    if m is None:
        return value
    mantissa, sign, exponent = m.groups()
    return f"{mantissa}\\times10^{{{'-' if sign == '-' else ''}{int(exponent)}}}"


# --- exact text -------------------------------------------------------------------------------

_INVISIBLE_LATEX = re.compile(r"\\(?:left|right|displaystyle|textstyle)(?![A-Za-z])|\\[,;:! ]|~|\s")


def plain_text(answer: str) -> str:
    """`answer` with spacing, ``\\left``/``\\right`` and ``\\dfrac``/``\\tfrac`` spellings made uniform."""
    return _INVISIBLE_LATEX.sub("", answer).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


# --- the form of an answer --------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerForm:
    """What is compared: a value (percent sign dropped, scientific notation in LaTeX) or a statement."""

    kind: str  # 'value' or 'statement'
    text: str
    exact_only: bool = False  # a percent sign left inside the value: only an exact text match counts


def answer_form(answer: str) -> Optional[AnswerForm]:
    """The form of an extracted (or gold) answer; None when it is blank."""
    text = unicode_form(answer).strip()
    if is_blank(text):
        return None
    kind, text = split_relation(text)
    if kind == "statement":
        return AnswerForm("statement", text)
    text, stray_percent = split_percent(text)
    if is_blank(text):
        return None  # '\%' alone says nothing
    return AnswerForm("value", scientific_to_latex(text), stray_percent)
