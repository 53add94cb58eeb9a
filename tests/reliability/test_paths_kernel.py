"""Issue 32, paths mean what the kernel means: with `link -> ../real/deep` (a symbolic link to a folder),
`link/../doc.txt` is real/doc.txt, as open() and the shell's `>` take it, never the text-edited w/doc.txt.
Every identity and output check (segcli.files) and where an output is written follow the kernel; a --glob
(segcli.corpus.expand_folder) stays inside the folder it is matched in.

The layout every test starts from (cwd top/w):

    top/real/doc.txt            the input document
    top/real/deep/              a folder
    top/real/deep/inner -> ../../other/sub
    top/other/sub/              a second linked folder (top/other/doc.txt is a second document)
    top/w/link -> ../real/deep
    top/w/l1 -> l2,  top/w/l2 -> ../real/deep   (a chain of two links to one folder)
    top/w/out.jsonl             a file of the user's, where text editing would put link/../out.jsonl
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segcli.corpus import expand, expand_folder
from segcli.errors import UsageError
from segcli.files import AtomicOutput, check_distinct, output_target

from conftest import ROOT, SAMPLE
from test_output_files import invoke, one_line, parts

TEXT = (SAMPLE / "hamlet.txt").read_text(encoding="utf-8")[:400]
KEEP = "the user's own file\n"


def make_layout(top: Path) -> Path:
    """The layout above under `top`; returns the working folder top/w."""
    for d in ("real/deep", "other/sub", "w"):
        (top / d).mkdir(parents=True)
    (top / "real" / "doc.txt").write_text(TEXT)
    (top / "other" / "doc.txt").write_text(TEXT[::-1])
    os.symlink("../../other/sub", top / "real" / "deep" / "inner")
    os.symlink("../real/deep", top / "w" / "link")
    os.symlink("../real/deep", top / "w" / "l2")
    os.symlink("l2", top / "w" / "l1")
    (top / "w" / "out.jsonl").write_text(KEEP)
    return top / "w"


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--device", "cpu", "-q", "--max-tokens", "20", "-s", "8"]


@pytest.fixture
def w(tmp_path, monkeypatch) -> Path:
    here = make_layout(tmp_path / "top")
    monkeypatch.chdir(here)
    return here


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- the two measured defects, through the CLI -------------------------------------------------------------------------

def test_input_under_a_link_dotdot_spelling_is_not_replaced(w, base):
    """`run link/../doc.txt -o ../real/doc.txt` named the input twice; it exited 0 and replaced it."""
    doc = w.parent / "real" / "doc.txt"
    one_line(invoke("run", "link/../doc.txt", *base, "-o", "../real/doc.txt"), 2,
             "--output ../real/doc.txt would replace input link/../doc.txt")
    assert doc.read_text() == TEXT and parts(w.parent) == []


@pytest.mark.parametrize("doc, out", [
    ("../real/doc.txt", "link/../doc.txt"),  # the other way round
    ("../real/doc.txt", "./link/../doc.txt"),
    ("../real/doc.txt", "./link/.././doc.txt"),
    ("../real/doc.txt", "l1/../doc.txt"),  # a chain of two links
    ("l1/../doc.txt", "link/../doc.txt"),
    ("../real/doc.txt", "link/inner/../../real/doc.txt"),  # a link inside a linked folder: other/.. is top
    ("../other/doc.txt", "link/inner/../doc.txt"),
], ids=["reversed", "dot-slash", "dots", "chain", "two-spellings", "nested-up", "nested"])
def test_other_spellings_of_the_input_refused(w, base, doc, out):
    before = {p: p.read_bytes() for p in (w.parent / "real" / "doc.txt", w.parent / "other" / "doc.txt")}
    one_line(invoke("run", doc, *base, "-o", out), 2, f"--output {out} would replace input {doc}")
    assert {p: p.read_bytes() for p in before} == before and parts(w.parent) == []


def test_output_written_where_the_kernel_puts_it(w, base):
    """`-o link/../out.jsonl` is real/out.jsonl (what `> link/../out.jsonl` writes), never w/out.jsonl."""
    res = invoke("run", "../real/doc.txt", *base, "-o", "link/../out.jsonl")
    assert res.exit_code == 0, res.output
    assert (w / "out.jsonl").read_text() == KEEP
    assert jsonl(w.parent / "real" / "out.jsonl")[-1]["type"] == "summary"
    assert parts(w.parent) == []


@pytest.mark.parametrize("out, where", [
    ("./link/../out.jsonl", "real/out.jsonl"),
    ("l1/../out.jsonl", "real/out.jsonl"),
    ("link/inner/../out.jsonl", "other/out.jsonl"),
    ("link/inner/../../w/../real/out.jsonl", "real/out.jsonl"),  # other/.. is top, which has w and real
])
def test_output_variants_written_where_the_kernel_puts_them(w, base, out, where):
    with open(out, "w") as f:  # the kernel's answer, asked directly
        f.write("kernel\n")
    assert (w.parent / where).read_text() == "kernel\n"
    res = invoke("run", "../real/doc.txt", *base, "-o", out)
    assert res.exit_code == 0, res.output
    assert jsonl(w.parent / where)[-1]["type"] == "summary"
    assert (w / "out.jsonl").read_text() == KEEP and parts(w.parent) == []


def test_the_critical_case_in_a_process_of_its_own(tmp_path, tiny_model_dir):
    """The command line as a user types it: a real process, cwd top/w."""
    here = make_layout(tmp_path / "top")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, "-m", "segcli", "run", "link/../doc.txt", "--model", str(tiny_model_dir),
                        "--device", "cpu", "-q", "--max-tokens", "20", "-s", "8", "-o", "../real/doc.txt"],
                       capture_output=True, text=True, env=env, cwd=here)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "would replace input link/../doc.txt" in lines[0], p.stderr
    assert (tmp_path / "top" / "real" / "doc.txt").read_text() == TEXT


# -- the other files a run reads or writes -----------------------------------------------------------------------------

def test_save_memory_against_output_under_a_link(w, base):
    one_line(invoke("run", "../real/doc.txt", *base, "-o", "../real/x", "--save-memory", "link/../x"), 2,
             "--save-memory link/../x is the same file as --output ../real/x")
    one_line(invoke("run", "../real/doc.txt", *base, "-o", "l1/../x", "--save-memory", "../real/x"), 2,
             "--save-memory ../real/x is the same file as --output l1/../x")
    assert not (w.parent / "real" / "x").exists() and parts(w.parent) == []


def test_save_memory_over_the_input_under_a_link(w, base):
    one_line(invoke("run", "../real/doc.txt", *base, "--save-memory", "link/../doc.txt", "-o", "o.jsonl"), 2,
             "--save-memory link/../doc.txt would replace input ../real/doc.txt")
    assert (w.parent / "real" / "doc.txt").read_text() == TEXT


def test_save_memory_and_output_apart_under_a_link(w, base):
    """`link/../m.st` and `m.st` are two files (real/m.st, w/m.st): both written, where the kernel puts them."""
    res = invoke("run", "../real/doc.txt", *base, "-o", "link/../out.jsonl", "--save-memory", "link/../m.st")
    assert res.exit_code == 0, res.output
    assert (w.parent / "real" / "m.st").stat().st_size > 0 and not (w / "m.st").exists()
    assert (w / "out.jsonl").read_text() == KEEP


@pytest.mark.parametrize("config", ["link/../c.yaml", "./l1/../c.yaml", "../real/c.yaml"])
def test_config_under_a_link_spelling(w, base, config):
    (w.parent / "real" / "c.yaml").write_text("seed: 1\n")
    out = "../real/c.yaml" if config.startswith("link") or config.startswith("./l1") else "link/../c.yaml"
    one_line(invoke("run", "../real/doc.txt", *base, "--config", config, "-o", out), 2,
             f"--output {out} would replace --config {config}")
    assert (w.parent / "real" / "c.yaml").read_text() == "seed: 1\n"


# -- the library piece -------------------------------------------------------------------------------------------------

def test_output_target_folder_is_the_kernels(w):
    t = output_target("link/../out.jsonl", "--output")
    assert t.kind == "new" and t.resolved == w.parent / "real" / "out.jsonl"
    t = output_target("link/../doc.txt", "--output")
    assert t.kind == "regular" and t.resolved == w.parent / "real" / "doc.txt"
    with AtomicOutput("./l1/../new.jsonl", "--output") as out:
        assert Path(out.path).parent == w.parent / "real"  # the temporary file is in the kernel's folder
        out.file.write("x\n")
    assert (w.parent / "real" / "new.jsonl").read_text() == "x\n" and not (w / "new.jsonl").exists()


def test_a_symlinked_file_under_a_link_spelling_is_followed(w):
    """A link to a file, reached through `link/..`: the file it points to is replaced, never the link."""
    os.symlink("doc.txt", w.parent / "real" / "alias.txt")
    t = output_target("link/../alias.txt", "--output")
    assert t.kind == "regular" and t.resolved == w.parent / "real" / "doc.txt"
    os.symlink("../../other/new.jsonl", w.parent / "real" / "deep" / "dangling")  # relative to real/deep
    t = output_target("l1/dangling", "--output")
    assert t.kind == "new" and t.resolved == w.parent / "other" / "new.jsonl"


@pytest.mark.parametrize("name, needle", [
    ("out.jsonl/../x", "is not a folder"),  # the kernel: ENOTDIR (text editing would make it w/x)
    ("link/..", "names a folder"),
    ("link/../", "names a folder"),
    ("link/../missing/x", "does not exist"),
    ("loop/../x", "symbolic links"),
])
def test_output_target_refused_as_the_kernel_refuses(w, name, needle):
    os.symlink("loop", w / "loop")
    with pytest.raises(UsageError, match=needle):
        output_target(name, "--output")
    if "/" in name:
        with pytest.raises(OSError):
            open(name, "a").close()  # the kernel refuses it too


def test_special_files_still_written_in_place_through_a_link_spelling(w):
    os.mkfifo(w.parent / "real" / "fifo")
    assert output_target("link/../fifo", "--output").kind == "special"
    check_distinct({"--output": "link/../fifo", "--save-memory": "../real/fifo"}, ["../real/doc.txt"])
    assert output_target("link/../../../../../../../../../../dev/stdout", "--output").kind in ("fd", "special")


# -- the property: whatever the spelling, the verdict is the kernel's --------------------------------------------------

STEPS = ["link", "l1", "l2", "..", ".", "inner", "deep", "real", "w", "other", "sub", "out.jsonl"]
NAMES = ["doc.txt", "out.jsonl", "new.jsonl"]


def kernel_folder(spelled: str):
    """(dev, ino) of the folder open() uses for `spelled`, or None where it cannot."""
    head = os.path.split(spelled)[0] or "."
    try:
        s = os.stat(head)
    except OSError:
        return None
    return (s.st_dev, s.st_ino) if stat.S_ISDIR(s.st_mode) else None


def kernel_file(spelled: str):
    try:
        s = os.stat(spelled)
    except OSError:
        return None
    return (s.st_dev, s.st_ino)


spelling = st.builds(lambda steps, name: "/".join([*steps, name]), st.lists(st.sampled_from(STEPS), max_size=5),
                     st.sampled_from(NAMES))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=spelling, b=spelling)
def test_checks_agree_with_the_kernel(w, a, b):
    doc = w.parent / "real" / "doc.txt"
    same_as_doc = kernel_file(a) == kernel_file(str(doc))
    try:
        check_distinct({"--output": a}, [str(doc)])
        refused = False
    except UsageError:
        refused = True
    assert refused == same_as_doc, a

    folder = kernel_folder(a)
    try:
        t = output_target(a, "--output")
    except UsageError:
        t = None
    if folder is None:
        assert t is None, a
    else:
        assert t is not None, a
        s = t.resolved.parent.stat()
        assert (s.st_dev, s.st_ino) == folder and t.resolved.name == os.path.basename(a), (a, t)

    # two outputs (both in folders that exist: otherwise both are refused): the same file exactly when the
    # kernel opens the same entry
    fa, fb = kernel_folder(a), kernel_folder(b)
    if fa is None or fb is None:
        return
    ka, kb = kernel_file(a), kernel_file(b)
    same = (ka is not None and ka == kb) or (ka is None and kb is None and fa is not None and fa == fb
                                              and os.path.basename(a) == os.path.basename(b))
    try:
        check_distinct({"--output": a, "--save-memory": b})
        clash = False
    except UsageError:
        clash = True
    assert clash == same, (a, b)


# -- a glob stays inside its folder ------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, needle", [
    ("../*.txt", "a '..' component leaves the folder"),
    ("deep/../../*.txt", "a '..' component leaves the folder"),
    ("**/../*.txt", "a '..' component leaves the folder"),
    ("/etc/*.conf", "an absolute pattern"),
], ids=["up", "down-and-up", "recursive-up", "absolute"])
def test_glob_leaving_the_folder_refused(w, base, pattern, needle):
    res = invoke("run", "../real", *base, "--glob", pattern, "-o", "o.jsonl")
    one_line(res, 2, f"--glob '{pattern}': {needle}")
    assert "give" in res.stderr and not (w / "o.jsonl").exists()


def test_absolute_glob_says_what_to_give(w, base):
    pattern = f"{w.parent}/real/*.txt"
    one_line(invoke("run", "../real", *base, "--glob", pattern, "-o", "o.jsonl"), 2,
             f"e.g. segcli run {w.parent}/real --glob '*.txt'")


def test_glob_does_not_follow_a_linked_folder_out(w):
    """real/deep/inner -> other/sub: '*/*.txt' in real/deep does not read other/sub; a folder link that stays
    inside is read; a link to a file, put in the folder, is read wherever it points."""
    deep = w.parent / "real" / "deep"
    (w.parent / "other" / "sub" / "secret.txt").write_text("outside\n")
    (deep / "mine").mkdir()
    (deep / "mine" / "a.txt").write_text("inside\n")
    os.symlink("mine", deep / "alias")  # a folder link that stays inside
    os.symlink("../../other/doc.txt", deep / "b.txt")  # a file link the user put there
    found = expand_folder(deep, "*/*.txt")
    assert [p.relative_to(deep).as_posix() for p in found] == ["alias/a.txt", "mine/a.txt"]
    assert [p.name for p in expand_folder(deep, "*.txt")] == ["b.txt"]
    assert [s.path for s in expand([str(deep)], glob="**/*.txt")] == [str(deep / "b.txt"), str(deep / "mine/a.txt")]
    with pytest.raises(UsageError, match="outside it"):
        expand_folder(deep, "inner/*.txt")  # every match is outside


def test_glob_in_a_folder_given_through_a_link_spelling(w):
    """The folder itself may be a link (or `link/..`): the pattern stays inside what the kernel opens."""
    found = expand(["link/.."], glob="*.txt")
    assert [s.path for s in found] == ["link/../doc.txt"]
    assert Path(found[0].path).read_text() == TEXT
