"""The README's quickstart runs and shows what it claims."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_quickstart_runs_and_its_claimed_result_holds() -> None:
    text = README.read_text()
    block = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    namespace: dict[str, Any] = {"__name__": "readme_quickstart"}
    exec(compile(block, "README.md", "exec"), namespace)
    claimed = re.search(r'analysis\.run\("http://x"\)\s+# -> (\{.*?\})', block)
    assert claimed is not None
    assert namespace["analysis"].run("http://x") == eval(claimed.group(1))


def test_the_readme_shows_the_two_set_up_commands() -> None:
    text = README.read_text()
    assert "make demo" in text
    assert "make test" in text
