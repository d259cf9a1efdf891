"""The README documents what the code does: its config table and its first two commands."""

from pathlib import Path

from common.config import markdown_table

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
CI = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()


def test_config_table_in_readme_matches_the_code() -> None:
    assert markdown_table() in README


def test_ci_runs_the_readme_test_command() -> None:
    blocks = [b.split("```")[0].strip() for b in README.split("```bash\n")[1:]]
    demo, tests = blocks[0], blocks[1]
    assert "dcf demo" in demo
    assert "pytest" in tests
    assert tests in CI
