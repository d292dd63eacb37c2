"""Spoken units of text, with and without spaces, and the barge-in cut built on them."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phoneagent.call.text_units import cut_units, spans, unit_count
from phoneagent.call.transcript import Turn, cut_turn
from phoneagent.doctor import normalise


def units(text: str) -> list[str]:
    return [text[a:b] for a, b in spans(text)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Of course. Can I have it?", ["Of", "course.", "Can", "I", "have", "it?"]),
        ("您好，仁心诊所。", ["您", "好", "仁", "心", "诊", "所"]),
        # Mixed Chinese and English, with and without spaces between them.
        ("预约是 Tuesday 上午10点", ["预", "约", "是", "Tuesday", "上", "午", "10", "点"]),
        ("请找Dr. Wang医生", ["请", "找", "Dr.", "Wang", "医", "生"]),
        ("日本語のテキスト", ["日", "本", "語", "の", "テ", "キ", "ス", "ト"]),
        ("ｶﾀｶﾅ", ["ｶ", "ﾀ", "ｶ", "ﾅ"]),  # half-width katakana
        ("안녕하세요 여러분", ["안녕하세요", "여러분"]),  # Korean is written with spaces
        ("— , 。！", []),  # punctuation alone is not spoken
        ("", []),
        ("葛\U000e0100城", ["葛\U000e0100", "城"]),  # a variation selector stays with its character
        ("ก็ได้", ["ก็", "ไ", "ด้"]),  # Thai vowel and tone marks stay with their letter
    ],
)
def test_units_are_words_or_characters_of_scripts_without_spaces(text, expected):
    assert units(text) == expected
    assert unit_count(text) == len(expected)


@pytest.mark.parametrize(
    ("text", "keep", "cut"),
    [
        ("您好，这里是仁心诊所。", 2, "您好"),
        ("您好，这里是仁心诊所。", 3, "您好，这"),  # what is between the units kept, as written
        ("您的预约是 Tuesday 上午十点", 6, "您的预约是 Tuesday"),
        ("Of course.  Can I", 2, "Of course."),
        ("  你好。 ", 5, "你好。"),  # all of it: trimmed
        ("你好", 0, ""),
    ],
)
def test_cut_keeps_the_first_units_as_written(text, keep, cut):
    assert cut_units(text, keep) == cut


def test_an_interrupted_chinese_turn_keeps_the_characters_heard():
    turn = Turn("agent", "item", 0, 0, "我们周一到周五，早上八点到晚上六点开门。")  # 18 characters
    cut_turn(turn, heard_ms=2000, sent_ms=4000)
    assert turn.text == "我们周一到周五，早上"  # half the audio: 9 characters
    assert turn.interrupted


def test_an_interrupted_english_turn_keeps_the_words_heard():
    turn = Turn("agent", "item", 0, 0, "We are open Monday to Friday from eight to six.")
    cut_turn(turn, heard_ms=1200, sent_ms=4000)
    assert turn.text == "We are open"  # 30 % of ten words


def test_heard_more_than_sent_keeps_everything_and_nothing_sent_keeps_the_text():
    turn = Turn("agent", "item", 0, 0, "您好。")
    cut_turn(turn, heard_ms=5000, sent_ms=4000)
    assert turn.text == "您好。"
    untouched = Turn("agent", "item", 0, 0, "您好")
    cut_turn(untouched, heard_ms=0, sent_ms=0)
    assert (untouched.text, untouched.interrupted) == ("您好", True)


def test_doctor_reads_chinese_the_same_with_or_without_spaces():
    assert normalise("您好，金龙餐厅。") == normalise("您好 金龙 餐厅")
    assert normalise("您好金龙餐厅") != normalise("您好金龙饭店")
    assert normalise("Hello,  WORLD!") == normalise("hello world")


# --- properties, over text mixing scripts, spaces and punctuation --------------------------

MIXED = st.text(
    alphabet=st.sampled_from(
        [*"abcXYZ019 \t\n.,!?'-", *"你好诊所预约上午点，。！？「」", *"のテキ", "\u0e01", "\u0e47"]
    ),
    max_size=60,
)


@given(MIXED, st.integers(min_value=-2, max_value=70))
def test_a_cut_is_a_prefix_holding_exactly_the_units_kept(text, keep):
    cut = cut_units(text, keep)
    assert text.lstrip().startswith(cut)
    assert unit_count(cut) == min(max(keep, 0), unit_count(text))
    assert units(cut) == units(text)[: unit_count(cut)]


@given(MIXED, st.integers(min_value=0, max_value=60))
def test_cutting_more_units_only_extends_the_cut(text, keep):
    assert cut_units(text, keep + 1).startswith(cut_units(text, keep))


@given(MIXED)
def test_units_are_ordered_disjoint_and_never_hold_a_space(text):
    found = spans(text)
    assert all(a < b for a, b in found)
    assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(found))
    assert not any(c.isspace() for a, b in found for c in text[a:b])


@given(st.text(alphabet=st.sampled_from(list("仁心家庭诊所预约周二上午")), max_size=40))
def test_chinese_counts_one_unit_per_character(text):
    assert unit_count(text) == len(text)


@given(st.lists(st.text(alphabet="abcdefgh0123456789'.,", min_size=1), max_size=12))
def test_text_with_spaces_counts_its_words(words):
    text = " ".join(words)
    spoken = [w for w in words if any(c.isalnum() for c in w)]
    assert unit_count(text) == len(spoken)


@given(MIXED, MIXED)
def test_mixed_text_counts_the_units_of_its_parts(first, second):
    assert unit_count(f"{first} {second}") == unit_count(first) + unit_count(second)


MS = st.integers(min_value=0, max_value=10_000)


@given(MIXED, MS, MS.filter(bool))
def test_a_barge_in_cut_is_proportional_to_the_audio_heard(text, heard_ms, sent_ms):
    turn = Turn("agent", "item", 0, 0, text)
    cut_turn(turn, heard_ms, sent_ms)
    expected = round(unit_count(text) * min(heard_ms, sent_ms) / sent_ms)
    assert unit_count(turn.text) == expected
    # Text with nothing spoken in it (punctuation, spaces) is left as it was.
    assert text.lstrip().startswith(turn.text) if unit_count(text) else turn.text == text
