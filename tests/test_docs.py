"""The commands in README.md and docs/ match the code.

Every `python ...` command in a code block (fenced or indented) and every
inline `python ...` span is checked without running its work: run.py's
through its own absl flags (config file, variant and every `--config.X=V`
override resolved as run.py resolves them), argparse programs (data_prep,
the converter, the benchmarks) through their own parsers, stopped right
after parsing. Optional parts written `[...]` are checked as given. The
README's test command must be the one CI runs. Blocks marked
`<!-- doc-check: run -->` are run for real on the synthetic corpus, with
their /tmp paths moved under the test's tmp_path.
"""

import argparse
import glob
import importlib.util
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs",
                                                             "*.md")))
RUN_MARK = "<!-- doc-check: run -->"
# Usage synopses: alternatives and ellipses are grammar, not a command.
SYNOPSIS = re.compile(r"\.\.\.|\||<[^>]*>")


def _blocks(text: str) -> list[tuple[list[str], bool]]:
  """(lines, marked to run) of each fenced or indented code block."""
  out, lines = [], text.splitlines()
  i, marked = 0, False
  while i < len(lines):
    line = lines[i]
    if line.strip() == RUN_MARK:
      marked = True
    elif line.startswith("```"):
      j = i + 1
      while j < len(lines) and not lines[j].startswith("```"):
        j += 1
      out.append((lines[i + 1:j], marked))
      marked, i = False, j
    elif line.startswith("    ") and (i == 0 or not lines[i - 1].strip()
                                      or lines[i - 1].strip() == RUN_MARK):
      j = i
      while j < len(lines) and (lines[j].startswith("    ")
                                or not lines[j].strip()):
        j += 1
      out.append(([l[4:] for l in lines[i:j]], marked))
      marked, i = False, j - 1
    elif line.strip():
      marked = False
    i += 1
  return out


def _commands(lines: list[str]) -> list[str]:
  """The `python ...` commands of a block: continuations joined, `&&`
  chains split, comments, `$ `, `time` and VAR=value prefixes dropped."""
  joined, cur = [], ""
  for line in lines:
    line = line.rstrip()
    if line.endswith("\\"):
      cur += line[:-1] + " "
      continue
    joined.append(cur + line)
    cur = ""
  out = []
  for line in joined:
    line = re.sub(r"\s+#.*$", "", line.strip())
    for part in re.split(r"\s*(?:&&|;)\s*", line):
      part = re.sub(r"^(\$\s+)?(time\s+)?", "", part.strip())
      part = re.sub(r"^([A-Z_]+=\S+\s+)+", "", part)
      if part.startswith(("python ", "python3 ")):
        out.append(part)
  return out


def documented_commands() -> list[tuple[str, str, bool]]:
  """(file, command, marked to run) for every documented command."""
  found = []
  for doc in DOCS:
    text = open(os.path.join(ROOT, doc)).read()
    for lines, marked in _blocks(text):
      found += [(doc, c, marked) for c in _commands(lines)
                if not SYNOPSIS.search(c)]
    no_blocks = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`(python3? [^`]+)`", no_blocks):
      span = " ".join(span.split())
      # `python -m data_prep img_db` in prose names a program, not a run.
      named = re.fullmatch(r"python3? -m [\w.]+( [\w-]+)?", span)
      if not SYNOPSIS.search(span) and "[" not in span and not named:
        found += [(doc, c, False) for c in _commands([span])]
  return found


COMMANDS = documented_commands()


def _argv(command: str) -> list[str]:
  # Optional parts are checked as written; `~` stays a literal path.
  return shlex.split(command.replace("[", " ").replace("]", " "))


class _Parsed(BaseException):
  """Raised right after an argparse parser accepted its arguments."""


@pytest.fixture(scope="module")
def run_py():
  """run.py imported once (its absl flags defined once), and its flags
  removed again afterwards: other tests in this process run programs
  (tfds's command line) whose flags would clash with run.py's `--config`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  before = set(flags.FLAGS)
  sys.path.insert(0, ROOT)
  spec = importlib.util.spec_from_file_location("run_py_doc_check",
                                                os.path.join(ROOT, "run.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  yield mod
  flags.FLAGS.unparse_flags()
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)


def _check_run_py(run_py, argv, monkeypatch):
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS
  fv.unparse_flags()
  # config_flags reads the overrides from sys.argv, as in a real run.
  monkeypatch.setattr(sys, "argv", ["run.py", *argv])
  monkeypatch.chdir(ROOT)
  try:
    fv(["run.py", *argv])
    cfg = run_py._CONFIG.value  # pylint: disable=protected-access
    assert cfg is not None and fv.workdir, "needs --config and --workdir"
    for arg in argv:
      if arg.startswith("--config.") and "=" in arg:
        field, value = arg[len("--config."):].split("=", 1)
        got = cfg
        for part in field.split("."):
          got = got[part]
        assert str(got) == value or str(value).lower() == str(got).lower() \
            or _same_number(got, value), (field, got, value)
  finally:
    fv.unparse_flags()
    for name in [n for n in fv if n.startswith("config.")]:
      delattr(fv, name)   # the override flags the parse defined


def _same_number(got, value) -> bool:
  try:
    return float(got) == float(value)
  except (TypeError, ValueError):
    return False


def _check_argparse(argv, monkeypatch):
  """Runs the program up to its argument parsing, then stops."""
  real = argparse.ArgumentParser.parse_args

  def parse_and_stop(self, args=None, namespace=None):
    raise _Parsed(real(self, args, namespace))

  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
  monkeypatch.chdir(ROOT)
  monkeypatch.setattr(sys, "path", [ROOT, *sys.path])
  if argv[0] == "-m":
    monkeypatch.setattr(sys, "argv", [argv[1], *argv[2:]])
    target = lambda: runpy.run_module(argv[1], run_name="__main__",
                                      alter_sys=True)
  else:
    script = os.path.join(ROOT, argv[0])
    assert os.path.exists(script), f"no such file: {argv[0]}"
    monkeypatch.setattr(sys, "argv", argv)
    target = lambda: runpy.run_path(script, run_name="__main__")
  try:
    target()
  except _Parsed:
    return
  except SystemExit as e:
    pytest.fail(f"the program refused its arguments (exit {e.code})")
  pytest.fail("the program finished without parsing arguments with "
              "argparse; check it another way")


# Commands the docs show as mistakes: they must be refused.
REFUSED = {"python run.py --config configs/demo.py:runlcoal --workdir /tmp/x"}
# Programs of the official UNITER repository the docs tell users to run
# there (not files of this repository).
OFFICIAL = {"scripts/eval_nlvr2.py"}


# Programs whose arguments are not parsed by argparse or absl flags.
def _check_parity_cases(argv):
  assert argv[1:] in ([], ["tiny"], ["base"]), argv


def test_commands_were_found():
  docs = {d for d, _, _ in COMMANDS}
  assert {"README.md", "docs/finetuning.md", "docs/data_prep.md",
          "docs/benchmarks.md"} <= docs
  assert sum(m for _, _, m in COMMANDS) >= 3
  assert len(COMMANDS) > 60


def test_readme_test_command_is_what_ci_runs():
  readme = open(os.path.join(ROOT, "README.md")).read()
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  cmds = [l.strip() for l in readme.splitlines() if "pytest" in l
          and l.startswith("    python3 -m venv")]
  assert len(cmds) == 1, cmds
  assert cmds[0] in ci


@pytest.mark.parametrize(
    "doc,command", [(d, c) for d, c, _ in COMMANDS],
    ids=[f"{d}:{c[:70]}" for d, c, _ in COMMANDS])
def test_documented_command_parses(doc, command, run_py, monkeypatch):
  del doc
  argv = _argv(command)[1:]
  if argv[:2] == ["-m", "venv"]:
    return   # the README's set-up line, run by .ci/run
  if argv[:2] == ["-m", "pytest"]:
    for path in argv[2:]:
      if path.startswith("tests"):   # the test files named (not -n 2)
        assert os.path.exists(os.path.join(ROOT, path.split("::")[0])), path
    return
  if command in REFUSED:
    with pytest.raises(Exception, match="unknown config variant"):
      _check_run_py(run_py, argv[1:], monkeypatch)
  elif argv[0] in OFFICIAL:
    assert not os.path.exists(os.path.join(ROOT, argv[0]))
  elif argv[0] == "run.py":
    _check_run_py(run_py, argv[1:], monkeypatch)
  elif argv[0] == "tests/parity_cases.py":
    _check_parity_cases(argv)
  elif argv[:2] == ["-m", "data_prep.tfds_build"]:
    restore = _without_run_py_flags(monkeypatch)
    try:
      _check_argparse(argv, monkeypatch)
    finally:
      restore()
  else:
    _check_argparse(argv, monkeypatch)


def _without_run_py_flags(monkeypatch):
  """tfds's command line inherits the absl flags; run.py's `--config`
  (defined in this process by the run.py checks) would clash with its own."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS
  saved = {n: fv[n] for n in ("config", "workdir", "log_level") if n in fv}
  for n in saved:
    delattr(fv, n)

  def restore():
    for n, flag in saved.items():
      if n not in fv:
        fv[n] = flag
  return restore


def test_marked_commands_run(tmp_path):
  marked = [(d, c) for d, c, m in COMMANDS if m]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  for doc, command in marked:
    argv = [a.replace("/tmp/", f"{tmp_path}/") for a in _argv(command)]
    argv[0] = sys.executable
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, (doc, command, r.stderr[-3000:])
    # What the command writes (its last path, or --workdir) is there.
    out = argv[argv.index("--workdir") + 1] if "--workdir" in argv \
        else argv[-1]
    assert os.path.exists(out), (doc, command, out)
