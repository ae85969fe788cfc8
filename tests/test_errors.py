"""How entry points report a person's mistakes."""

from __future__ import annotations

import pytest

from grounding.errors import DataError, redact, run


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://ann:s3cret@host:5000/x", "http://ann:***@host:5000/x"),
        ("postgresql://mlflow:p%40ss@db/mlflow", "postgresql://mlflow:***@db/mlflow"),
        (
            "at s3://bucket/key and ssh://ann@host/path",
            "at s3://bucket/key and ssh://ann@host/path",
        ),
        ("two: http://a:1@h and https://b:2@k", "two: http://a:***@h and https://b:***@k"),
        ("sqlite:////work/mlflow.db", "sqlite:////work/mlflow.db"),
    ],
)
def test_redact_masks_the_password_of_every_uri(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_run_prints_a_user_error_without_its_password(capsys: pytest.CaptureFixture[str]) -> None:
    def main(argv: list[str] | None) -> None:
        raise DataError("cannot reach http://ann:s3cret@127.0.0.1:5000")

    with pytest.raises(SystemExit) as exit_info:
        run(main)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: cannot reach http://ann:***@127.0.0.1:5000\n"
