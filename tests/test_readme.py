"""The README's first lines are the two set-up commands, and .ci/run runs the test one."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    lines = ROOT.joinpath("README.md").read_text().splitlines()
    assert lines[0].startswith("```")
    end = lines.index("```", 1)
    return [line for line in lines[1:end] if line.strip()]


def test_readme_starts_with_two_commands():
    cmds = readme_commands()
    assert len(cmds) == 2
    assert "napari-qsm demo" in cmds[0] and "torch==2.13.0" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = ROOT.joinpath(".ci", "run").read_text().splitlines()
    assert readme_commands()[1] in [line.strip() for line in ci]


def test_readme_quotes_the_demo_estimate_the_demo_prints():
    """One source for the demo's time: the README's number is napari_qsm.demo's measured table, summed."""
    import re

    from napari_qsm import demo
    from napari_qsm.methods import available_methods

    said = re.findall(r"about (\d+) s on an idle 2-core CPU", ROOT.joinpath("README.md").read_text())
    assert said, "the README no longer states the demo's time"
    printed = demo.expected_seconds([m.name for m in available_methods() if m.field_kind == "local"])  # tfi-medi
    assert [int(x) for x in said] == [round(printed)] * len(said)
