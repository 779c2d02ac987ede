"""Rates as admins write them (``100/1m``, ``20/h``, ``off``): parse_rate and format_rate."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spamkiller.units import Rate, format_duration, format_rate, parse_rate

# What every refusal must say, so that the config line tells the admin what to write instead.
ACCEPTED_FORMS = "a count per duration such as 100/1m, 20/h or 5000/1d, or off"


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("100/1m", Rate(100, 60.0)),
        ("100/m", Rate(100, 60.0)),  # one of the unit
        ("20/h", Rate(20, 3600.0)),
        ("20/1h", Rate(20, 3600.0)),
        ("5000/1d", Rate(5000, 86400.0)),
        ("3/250ms", Rate(3, 0.25)),  # parse_duration takes ms, so a rate does too
        ("1/ms", Rate(1, 0.001)),
        ("10/30s", Rate(10, 30.0)),
        ("10/30", Rate(10, 30.0)),  # a bare number is seconds, as in every duration
        ("7/1.5s", Rate(7, 1.5)),
        ("1/90m", Rate(1, 5400.0)),
        (" 12 / 5M ", Rate(12, 300.0)),  # blanks and the unit's case do not matter
        ("1/7d", Rate(1, 604800.0)),
    ],
)
def test_parse_rate(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("value", ["off", "OFF", " Off ", "0", " 0 ", 0])
def test_off_and_zero_mean_no_limit(value: str | int) -> None:
    assert parse_rate(value) is None


@pytest.mark.parametrize(
    "value",
    [
        "100",  # a count without a duration
        "/1m",  # a duration without a count
        "x/1m",
        "-1/1m",
        "+1/1m",
        "1.5/1m",  # counts are whole
        "100/",
        "",
        "none",
        "unlimited",
        100,  # a bare number other than 0: probably meant per something
        True,
        False,
    ],
)
def test_refusals_say_what_is_accepted(value: object) -> None:
    with pytest.raises(ValueError) as caught:
        parse_rate(value)  # type: ignore[arg-type]
    assert ACCEPTED_FORMS in str(caught.value)


@pytest.mark.parametrize("value", [True, False])
def test_booleans_are_named_as_such(value: bool) -> None:
    # YAML turns yes/no/on/off into booleans; the admin must learn that is what was read.
    with pytest.raises(ValueError, match="got a boolean"):
        parse_rate(value)


@pytest.mark.parametrize("value", [1.5, 60.0, float("nan"), float("inf")])
def test_floats_are_refused(value: float) -> None:
    with pytest.raises(ValueError) as caught:
        parse_rate(value)  # type: ignore[arg-type]
    assert ACCEPTED_FORMS in str(caught.value)


@pytest.mark.parametrize("text", ["0/1m", "00/1h", "1/0s", "1/0", "1/0ms", "0/0s"])
def test_zero_count_or_window_is_refused_and_points_to_off(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_rate(text)
    message = str(caught.value)
    assert text in message
    assert "above zero" in message and "off" in message


@pytest.mark.parametrize(
    ("text", "bad_part"),
    [
        ("100/1x", "unknown duration unit 'x'"),
        ("100/1h30m", "1h30m"),  # one unit per value, as for durations
        ("100/-1m", "-1m"),
        ("100/soon", "soon"),
        ("10/m/s", "m/s"),
    ],
)
def test_bad_durations_are_named_with_the_whole_value(text: str, bad_part: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_rate(text)
    message = str(caught.value)
    assert repr(text) in message and bad_part in message
    # ... and the duration's own help: which units there are.
    assert "ms, s, m, h or d" in message


def test_a_digit_python_counts_but_int_refuses_still_gets_the_help() -> None:
    # str.isdigit() is true for superscripts, which int() refuses: the refusal must still be
    # the admin-facing one, not int()'s "invalid literal for int() with base 10".
    with pytest.raises(ValueError) as caught:
        parse_rate("²/1m")
    assert ACCEPTED_FORMS in str(caught.value)


@pytest.mark.parametrize(
    ("rate", "text"),
    [
        (None, "off"),
        (Rate(100, 60.0), "100/1m"),
        (Rate(20, 3600.0), "20/1h"),
        (Rate(5000, 86400.0), "5000/1d"),
        (Rate(3, 0.25), "3/250ms"),
        (Rate(10, 90.0), "10/90s"),
        (Rate(7, 1.5), "7/1500ms"),
        (Rate(1, 604800.0), "1/7d"),
    ],
)
def test_format_rate_uses_the_largest_exact_unit(rate: Rate | None, text: str) -> None:
    assert format_rate(rate) == text


@pytest.mark.parametrize(
    "text",
    ["100/1m", "20/h", "5000/1d", "3/250ms", "10/90s", "7/1.5s", "1/0.5", "2/36h", "off", "0"],
)
def test_format_rate_round_trips_parse_rate(text: str) -> None:
    rate = parse_rate(text)
    assert parse_rate(format_rate(rate)) == rate


@given(
    count=st.integers(min_value=1, max_value=10**9),
    window=st.one_of(
        st.integers(min_value=1, max_value=10**7).map(float),
        st.integers(min_value=1, max_value=10**6).map(lambda ms: ms / 1000),
        st.floats(min_value=1e-3, max_value=1e7, allow_nan=False, allow_infinity=False),
    ),
)
def test_format_rate_round_trips_any_rate(count: int, window: float) -> None:
    rate = Rate(count, window)
    text = format_rate(rate)
    assert parse_rate(text) == rate
    assert text.startswith(f"{count}/") and text.endswith(format_duration(window))
