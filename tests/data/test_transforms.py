"""Auto-augment strings: checked against timm's grammar before timm (which skips sections it cannot read) sees them."""

import pytest

from patfast.data.transforms import build_transform, check_auto_augment
from patfast.errors import UserError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
VALID = ["rand-m9-mstd0.5-inc1", "rand", "rand-n3-m12-mmax15-p0.7-mstd101", "rand-m9-tweights", "rand-inc0-p1",
         "augmix-m5-w4-d2", "augmix-m5-b1-a0.5-mstd0.5", "original", "originalr", "v0", "v0r-mstd0.5", "3a"]


@pytest.mark.parametrize("text", VALID)
def test_valid_strings_pass_and_build_with_timm(text):
    assert check_auto_augment(f" {text} ") == text
    build_transform(True, 16, MEAN, STD, auto_augment=text)


@pytest.mark.parametrize("text", [None, "", "  "])
def test_empty_is_off(text):
    assert check_auto_augment(text) is None


@pytest.mark.parametrize("text, reason", [
    ("rand-bogus", "unknown section 'bogus' (the form is rand[-m<int>][-n<int>][-mstd<float>][-mmax<int>][-inc<0|1>]"
                   "[-p<float>][-t<weights|3aw|3a>])"),
    ("rand-m9-foo", "unknown section 'foo'"),
    ("rand-inc", "unknown section 'inc'"),
    ("rand-w0", "unknown section 'w0'"),  # timm 1.x dropped the 'w' key
    ("rand-m9.5", "section 'm9.5': rand m takes an integer"),
    ("rand-inc2", "section 'inc2': rand inc takes 0|1"),
    ("rand-p2", "section 'p2': p is a probability in [0, 1]"),
    ("rand-tfoo", "section 'tfoo': rand t takes weights|3aw|3a"),
    ("rand--m9", "an empty section"),
    ("rand-m9-", "an empty section"),
    ("augmix-x3", "unknown section 'x3' (the form is augmix[-m<int>][-w<int>][-d<int>][-a<float>][-b<0|1>]"
                  "[-mstd<float>])"),
    ("original-m9", "unknown section 'm9' (the form is original[-mstd<float>])"),
    ("randm9", "it must start with rand, augmix or one of original, originalr, v0, v0r, 3a, not 'randm9'"),
    ("garbage", "it must start with rand, augmix or one of original, originalr, v0, v0r, 3a, not 'garbage'"),
])
def test_bad_strings_are_one_line_user_errors(text, reason):
    with pytest.raises(UserError) as e:
        check_auto_augment(text)
    message = str(e.value)
    assert message.startswith(f"bad auto-augment '{text}': {reason}")
    assert message.endswith("; e.g. rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w4-d2 (AugMix) or original "
                            "(AutoAugment)")
    assert "\n" not in message


def test_build_transform_refuses_what_timm_would_skip():
    with pytest.raises(UserError, match="bad auto-augment 'rand-bogus': unknown section 'bogus'"):
        build_transform(True, 16, MEAN, STD, auto_augment="rand-bogus")
    build_transform(False, 16, MEAN, STD, auto_augment="rand-bogus")  # eval ignores auto_augment, as before
