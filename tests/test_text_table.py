"""How the commands and the scripts of bench/ print a table."""

from __future__ import annotations

from star_engine.measure.text_table import text_table


def test_columns_are_as_wide_as_their_widest_cell_names_to_the_left_numbers_to_the_right():
    rows = [{"method": "star", "context": 1024, "ttft s": 0.123456},
            {"method": "star balanced", "context": 131072, "ttft s": 12345.6, "note": "over memory"}]
    assert text_table(rows, ["method", "context", "ttft s", "note"], left={"method", "note"}).splitlines() == [
        "method         context  ttft s  note",
        "star              1024   0.123  -",
        "star balanced   131072   12346  over memory",
    ]


def test_a_missing_or_none_value_shows_a_dash_and_a_string_shows_as_given():
    text = text_table([{"a": None, "b": "0.50 (100%)"}, {"b": "-"}], ["a", "b"])
    assert text.splitlines() == ["a            b", "-  0.50 (100%)", "-            -"]
