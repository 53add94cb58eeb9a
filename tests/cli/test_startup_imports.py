"""Issue 29, start-up: commands that compute nothing import neither torch nor transformers.

`segcli --help`, every command's `--help`, `--version` and `segcli policies` answer in a fraction of a second only
while nothing on their path imports torch (about 1.5 s) or transformers; one module-level import in a command module,
`segcli.config` or a package `__init__` brings that back. Each case runs in a fresh interpreter (this test process has
torch loaded already), in-process there through Typer's CliRunner, and the test names the first command after which
torch or transformers was in `sys.modules`.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers")
CASES = [  # (argv, exit code); then every command's --help
    ([], 2), (["--help"], 0), (["-h"], 0), (["--version"], 0),
    (["policies"], 0), (["policies", "--format", "json"], 0), (["policies", "--format", "csv"], 0),
]

CHILD = """
import json, sys
import typer.main
from typer.testing import CliRunner
from segcli.cli import app

heavy = {heavy!r}
runner = CliRunner()
commands = list(typer.main.get_command(app).commands)
for argv, code in {cases!r} + [([c, "--help"], 0) for c in commands]:
    res = runner.invoke(app, argv)
    loaded = [m for m in heavy if m in sys.modules]
    if res.exit_code != code or loaded:
        print(json.dumps({{"argv": argv, "exit_code": res.exit_code, "loaded": loaded, "output": res.output[-400:]}}))
        sys.exit(1)
loaded = [m for m in heavy if m in sys.modules]
print(json.dumps({{"argv": None, "loaded": loaded}}))
"""


def test_help_version_and_policies_import_neither_torch_nor_transformers():
    out = subprocess.run([sys.executable, "-c", CHILD.format(heavy=HEAVY, cases=CASES)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode in (0, 1), out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0, (f"`{' '.join(['segcli', *result['argv']])}` exited {result['exit_code']} with "
                                 f"{', '.join(result['loaded']) or 'nothing heavy'} imported:\n{result['output']}")


def test_importing_the_cli_imports_neither_torch_nor_transformers():
    code = "import sys, segcli.cli; print([m for m in %r if m in sys.modules])" % (HEAVY,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"
