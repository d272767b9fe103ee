"""MailboxLayout: the hash schemes (delivery/layout.py)."""

import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from delivery.layout import SCHEMES, LayoutError, MailboxLayout, check_user, levels


@pytest.mark.parametrize(
    "scheme,user,expected",
    [
        ("first3", "juan", "j/u/a/juan"),  # the paper's III.C
        ("first3", "jo", "j/o/jo"),
        ("first3", "j", "j/j"),
        ("first3", "ab.c", "a/b/ab.c"),  # "." as a level is dropped
        ("first2last", "juan", "j/u/n/juan"),
        ("first2last", "jo", "j/o/o/jo"),
        ("first2last", "j", "j/j/j"),
        ("firstlast2", "juan", "j/a/n/juan"),
        ("firstlast2", "jo", "j/j/o/jo"),
        ("firstlast2", "j", "j/j/j/j"),
        ("hash2", "juan", "1b/211b/juan"),  # values checked against doveadm
        ("hash2", "jo", "ff/09ff/jo"),
        ("hash2", "ab.c", "03/e303/ab.c"),
        ("first3", "Juan", "j/u/a/juan"),  # lower-cased, as Dovecot's %Lu
        ("hash2", "JUAN", "1b/211b/juan"),
    ],
)
def test_paths(scheme, user, expected):
    assert MailboxLayout("/srv/mail", scheme).path(user) == pathlib.Path("/srv/mail") / expected


def test_default_scheme_is_first3():
    assert MailboxLayout("/r").scheme == "first3"
    assert MailboxLayout("/r").path("pepe") == pathlib.Path("/r/p/e/p/pepe")


@pytest.mark.parametrize("bad", ["", ".hidden", "a/b", "..", "a b", "ñandu", "x\x00y", "a" * 256])
def test_unusable_names_refused(bad):
    with pytest.raises(LayoutError):
        MailboxLayout("/r").path(bad)


def test_unknown_scheme():
    with pytest.raises(LayoutError):
        MailboxLayout("/r", "first4")


@given(
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40),
    st.sampled_from(SCHEMES),
)
def test_path_stays_under_root(name, scheme):
    try:
        check_user(name)
    except LayoutError:
        return
    rel = MailboxLayout("/r", scheme).relative(name)
    assert rel.name == name.lower()
    assert ".." not in rel.parts and "." not in rel.parts
    assert all(len(p) in (1, 2, 4) for p in levels(name, scheme))
    assert not rel.is_absolute()
