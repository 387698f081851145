"""README's Python API snippets run as written, and README's two commands are the ones CI uses."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _api_blocks():
    section = README.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.parametrize("index", range(len(_api_blocks())))
def test_python_api_snippet_runs(index):
    exec(compile(_api_blocks()[index], f"README.md python block {index}", "exec"), {})


def test_readme_has_two_commands_and_ci_runs_the_test_one():
    commands = re.findall(r"```bash\n(.*?)\n```", README.split("## Fresh machine", 1)[1].split("\n## ", 1)[0], re.S)
    assert len(commands) == 2
    assert commands[1].strip() in (ROOT / ".ci" / "run").read_text()
