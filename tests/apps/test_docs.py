"""The docs run as written: every Python and shell block of README.md and docs/quickstart.md is
executed, and every CLI option has a help string and appears in docs/quickstart.md's table.

A block may be preceded by a marker comment:
* ``<!-- docs-test: setup-done (...) -->``: the block's environment setup (``python3 -m venv``,
  ``. .venv/bin/activate``, ``pip install``) is what this test environment already is; the
  rest of the block runs.
* ``<!-- docs-test: substitute A=@name B=@name -->``: placeholders replaced by this test's
  fixtures (``@llama_silu_checkpoint``, ``@smollm2_gguf``).
* ``<!-- docs-test: skip (why) -->``: not run, for the reason given (only the README's test
  command, which is this run itself)."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "docs" / "quickstart.md"]
SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
BLOCK = re.compile(r"(?:<!-- docs-test: (?P<marker>[^>]*?) -->\n)?```(?P<lang>python|bash)\n(?P<code>.*?)```", re.S)
SETUP = re.compile(r"^(python3 -m venv \S+|\. \S+/bin/activate|pip install .*?)(\s+#.*)?$")


def blocks():
    for doc in DOCS:
        for i, m in enumerate(BLOCK.finditer(doc.read_text())):
            yield pytest.param(doc, m.group("lang"), m.group("code"), m.group("marker") or "",
                               id=f"{doc.name}-{i}-{m.group('lang')}")


def _setup_done(code: str) -> str:
    """The block without its environment setup: ``&&``-chained and one-per-line commands."""
    kept = []
    for line in code.splitlines():
        parts = [p.strip() for p in line.split("&&")]
        rest = [p for p in parts if not SETUP.match(p)]
        if rest:
            kept.append(" && ".join(rest))
    return "\n".join(kept)


@pytest.mark.parametrize("doc,lang,code,marker", list(blocks()))
def test_doc_block_runs(doc, lang, code, marker, tmp_path, ckpt_factory):
    if marker.startswith("skip"):
        assert "(" in marker, f"{doc.name}: a skipped block must say why"
        return
    if marker.startswith("setup-done"):
        code = _setup_done(code)
    if marker.startswith("substitute"):
        fixtures = {"@llama_silu_checkpoint": lambda: ckpt_factory("llama", "silu"), "@smollm2_gguf": lambda: SMOLLM2}
        for pair in marker.split()[1:]:
            placeholder, name = pair.split("=")
            value = fixtures[name]()
            if not Path(value).exists():
                pytest.fail(f"{name} is missing here ({value}); run bench/get_smollm2.py")
            code = code.replace(placeholder, str(value))
    env = dict(os.environ, EDGESPARSE_QUIET="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, f"{doc.name} block failed:\n{code}\n--- stderr:\n{r.stderr[-3000:]}"


def _options():
    from edgesparse.apps.cli import build_parser

    def walk(p, path):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    yield from walk(sp, path + [name])
            elif not isinstance(a, argparse._HelpAction):
                yield " ".join(path), a
    return list(walk(build_parser(), []))


def test_every_cli_option_has_help_and_lists_its_choices():
    missing = [f"{cmd} {a.option_strings or a.dest}" for cmd, a in _options() if not a.help]
    assert not missing, missing
    from edgesparse.apps.cli import build_parser
    demo = build_parser()._subparsers._group_actions[0].choices["demo"].format_help()
    assert "{auto," in demo   # --backend's choices are listed


def test_quickstart_cli_table_names_every_option():
    table = (ROOT / "docs" / "quickstart.md").read_text()
    rows = {}
    for line in table.splitlines():
        m = re.match(r"\| `edgesparse (\w+(?: (?:ppl|zeroshot|ffn|decode))?)", line)
        if m:
            rows[m.group(1)] = line
    missing = []
    for cmd, a in _options():
        if not cmd or not a.option_strings:
            continue
        row = rows.get(cmd)
        if row is None or not any(o in row for o in a.option_strings):
            missing.append(f"{cmd} {a.option_strings[-1]}")
    assert not missing, f"docs/quickstart.md's CLI table lacks: {missing}"
