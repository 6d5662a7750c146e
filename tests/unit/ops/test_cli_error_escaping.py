"""Every CLI error line shows what it quotes from user input (file names, options, arguments) with control,
format and separator characters escaped: a hostile name can neither drive the terminal nor read differently from
what it is (bidi overrides, isolates, zero-width characters: "Trojan Source"), and the error stays one line.
Ordinary non-ASCII text (accents, CJK, emoji) stays readable."""

from __future__ import annotations

import contextlib
import io
import unicodedata
from pathlib import Path

import pytest

from ops.cli.errors import CliError, escaped
from ops.cli.main import main
from ops.servers import free_port

ESCAPED = [
    ("newline", "a\nb", "a\\nb"),
    ("carriage return", "a\rb", "a\\rb"),
    ("terminal escape sequence", "\x1b[2J", "\\x1b[2J"),
    ("delete", "a\x7fb", "a\\x7fb"),
    ("C1 control (NEL)", "a\x85b", "a\\x85b"),
    ("C1 control (CSI)", "a\x9b2Jb", "a\\x9b2Jb"),
    ("right-to-left override", "evil\u202etxt.yaml", "evil\\u202etxt.yaml"),
    ("left-to-right override", "a\u202db", "a\\u202db"),
    ("pop directional formatting", "a\u202cb", "a\\u202cb"),
    ("right-to-left embedding", "a\u202bb", "a\\u202bb"),
    ("left-to-right isolate", "a\u2066b", "a\\u2066b"),
    ("right-to-left isolate", "a\u2067b", "a\\u2067b"),
    ("first strong isolate", "a\u2068b", "a\\u2068b"),
    ("pop directional isolate", "a\u2069b", "a\\u2069b"),
    ("zero-width space", "llama\u200b-8b", "llama\\u200b-8b"),
    ("zero-width non-joiner", "a\u200cb", "a\\u200cb"),
    ("zero-width joiner", "a\u200db", "a\\u200db"),
    ("left-to-right mark", "a\u200eb", "a\\u200eb"),
    ("right-to-left mark", "a\u200fb", "a\\u200fb"),
    ("byte order mark", "\ufeffname", "\\ufeffname"),
    ("soft hyphen", "a\xadb", "a\\xadb"),
    ("arabic letter mark", "a\u061cb", "a\\u061cb"),
    ("word joiner", "a\u2060b", "a\\u2060b"),
    ("line separator", "a\u2028b", "a\\u2028b"),
    ("paragraph separator", "a\u2029b", "a\\u2029b"),
    ("invisible tag character", "a\U000e0041b", "a\\U000e0041b"),
    ("undecodable byte of a file name", "a\udcffb.yaml", "a\\udcffb.yaml"),
    ("private-use character (an icon font draws anything there)", "a\ue0b0b", "a\\ue0b0b"),
    ("supplementary private-use character", "a\U000f0001b", "a\\U000f0001b"),
    ("unassigned code point", "a\U0003ffffb", "a\\U0003ffffb"),
    ("a backslash, so that what follows it is never read as an escape", "C:\\spec", "C:\\\\spec"),
]

READABLE = [
    ("plain ASCII", "cannot read spec ./chat.yaml: No such file or directory"),
    ("accents", "modèle café naïve Ñandú"),
    ("precomposed and combining accents", "e\u0301 \xe9"),
    ("CJK", "模型 モデル 모델"),
    ("right-to-left script", "نموذج מודל"),
    ("emoji", "🚀 llama 🦙"),
    ("emoji with a variation selector", "\u2764\ufe0f"),
    ("a no-break space", "8\xa0GiB"),
    ("quotes", "'a' \"b\""),
]


@pytest.mark.parametrize(("raw", "shown"), [r[1:] for r in ESCAPED], ids=[r[0] for r in ESCAPED])
def test_control_format_and_separator_characters_are_shown_escaped(raw: str, shown: str) -> None:
    assert escaped(raw) == shown


@pytest.mark.parametrize("text", [r[1] for r in READABLE], ids=[r[0] for r in READABLE])
def test_ordinary_text_is_shown_as_it_is(text: str) -> None:
    assert escaped(text) == text


def test_a_typed_escape_sequence_reads_differently_from_the_character_it_names() -> None:
    # the six characters backslash, u, 2, 0, 2, e are text anyone can type; shown as they are, they read exactly
    # like an escaped U+202E
    assert escaped("evil\\u202etxt") == "evil\\\\u202etxt"
    assert escaped("evil\\u202etxt") != escaped("evil\u202etxt")


def test_nothing_escaped_is_left_that_a_terminal_would_act_on_or_hide() -> None:
    every_hostile = "".join(raw for _, raw, _ in ESCAPED)
    unsafe = {"Cc", "Cf", "Cn", "Co", "Cs", "Zl", "Zp"}
    assert all(unicodedata.category(c) not in unsafe for c in escaped(every_hostile))


def test_a_cli_error_keeps_its_message_escaped() -> None:
    assert str(CliError("unknown worker w\u202e1\n")) == "unknown worker w\\u202e1\\n"


@pytest.fixture
def no_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ports nothing listens on: no command here gets as far as a connection."""
    monkeypatch.setenv("GANTRY_NATS_URL", f"nats://127.0.0.1:{free_port()}")
    monkeypatch.setenv("GANTRY_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")


def error_line(*args: str) -> str:
    """What ``gantry ARGS`` prints on stderr, after checking it failed with one line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            pytest.raises(SystemExit) as failed:
        main(list(args))
    assert failed.value.code not in (0, None)
    assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("error: "), err.getvalue()
    return err.getvalue()


@pytest.mark.usefixtures("no_stack")
def test_a_spec_file_name_with_a_bidi_override_is_shown_escaped(tmp_path: Path) -> None:
    line = error_line("deploy", str(tmp_path / "report\u202elmay.exe"))
    assert "report\\u202elmay.exe" in line and "\u202e" not in line


@pytest.mark.usefixtures("no_stack")
def test_a_spec_file_name_holding_a_typed_escape_sequence_shows_its_backslash_escaped(tmp_path: Path) -> None:
    line = error_line("deploy", str(tmp_path / "report\\u202elmay.exe"))
    assert "report\\\\u202elmay.exe" in line


@pytest.mark.usefixtures("no_stack")
@pytest.mark.parametrize(
    ("args", "shown"),
    [(("delete", "a\\b"), "invalid model name 'a\\\\b'"),
     (("workers", "remove", "w\\1"), "invalid worker name 'w\\\\1'"),
     (("cordon", "w\\1:x"), "got 'w\\\\1:x'"),
     (("simulate", "--model", "a\\b"), "unknown model 'a\\\\b': not in the catalogue"),
     (("simulate", "--gpu", "a\\b"), "unknown GPU 'a\\\\b': not in the spec table"),
     (("up", "--workers", "1", "--gpu-type", "a\\b"), "unknown GPU type 'a\\\\b' (known: ")],
    ids=["model name", "worker name", "cordon target", "catalogue model", "catalogue GPU", "fleet GPU type"],
)
def test_a_backslash_typed_in_a_name_is_escaped_once(args: tuple[str, ...], shown: str) -> None:
    # quoting a name with repr() escapes it a first time: the line would show a typed backslash as four
    assert shown in error_line(*args)


@pytest.mark.usefixtures("no_stack")
@pytest.mark.parametrize(
    ("args", "shown"),
    [(("deploy", "--x\u2066y"), "--x\\u2066y"),  # click: "No such option"
     (("scale", "m", "2", "x\u200by\nz"), "x\\u200by"),  # click: "Got unexpected extra argument(s)"
     (("events", "--last", "1\u202e"), "Invalid value for '--last'")],  # click's own message, one line
    ids=["unknown option", "extra argument", "bad value"],
)
def test_a_usage_error_quoting_what_was_typed_shows_it_escaped(args: tuple[str, ...], shown: str) -> None:
    line = error_line(*args)
    assert shown in line
    assert all(unicodedata.category(c) not in {"Cc", "Cf", "Zl", "Zp"} for c in line.rstrip("\n"))  # nor the \n
