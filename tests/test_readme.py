"""The README and the docs/ pages stay true: every command they give names a real command,
flags it takes and files that exist, every link points at a file, and the front page stays short."""

import os
import re
import shlex

import pytest

from curriculum_seg import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.join("docs", p) for p in os.listdir(
    os.path.join(REPO, "docs")) if p.endswith(".md"))


def _read(page):
  with open(os.path.join(REPO, page)) as f:
    return f.read()


def _commands(text):
  """Each `curriculum-seg ...` line of the page's shell blocks and inline code, joined across
  backslash continuations."""
  lines = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    joined = re.sub(r"\\\n\s*", " ", block)
    lines += [line.strip() for line in joined.splitlines()]
  lines += re.findall(r"`(curriculum-seg [^`]+)`", text)
  return [line for line in lines if line.startswith(("curriculum-seg ", "./run.sh "))]


def _flags(command):
  """The option strings `curriculum-seg COMMAND --help` lists."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  out = io.StringIO()
  with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
    cli.main([command, "--help"])
  return set(re.findall(r"(--[a-z_]+)", out.getvalue()))


@pytest.mark.parametrize("page", PAGES)
def test_every_command_is_real(page):
  flags = {}
  for line in _commands(_read(page)):
    words = shlex.split(line.split("#")[0].replace("[", " ").replace("]", " ").replace("|", " "))
    if words[0] == "./run.sh":
      assert words[1] in ("demo", "test"), line
      continue
    command = words[1]
    assert command in cli.COMMANDS, f"{page}: unknown command in {line!r}"
    if command not in flags:
      flags[command] = _flags(command)
    for i, word in enumerate(words[2:], start=2):
      if word.startswith("--config."):
        continue
      if word.startswith("--"):
        name = word.split("=")[0]
        assert name in flags[command], f"{page}: {command} has no {name} ({line!r})"
        if name == "--config":
          value = word.split("=", 1)[1] if "=" in word else words[i + 1]
          path = value.split(":")[0]
          if not re.fullmatch(r"[A-Z_]+", path):  # FILE, DIR: placeholders
            assert os.path.exists(os.path.join(REPO, path)), f"{page}: no config {path}"


@pytest.mark.parametrize("page", PAGES)
def test_every_link_and_file_exists(page):
  text = _read(page)
  folder = os.path.dirname(os.path.join(REPO, page))
  for target in re.findall(r"\]\(([^)#]+)\)", text):
    if "://" in target:
      continue
    assert os.path.exists(os.path.join(folder, target)), f"{page}: broken link {target}"
  for path in re.findall(r"`((?:configs|benchmarks|experiments|curriculum_seg|data_pipelines|"
                         r"notebooks|tests)/[\w./-]+\.(?:py|ipynb))", text):
    assert os.path.exists(os.path.join(REPO, path)), f"{page}: no file {path}"


def test_the_front_page_is_short():
  text = _read("README.md")
  assert len(text.splitlines()) <= 150
  prose = re.sub(r"```.*?```", "", text, flags=re.S)
  for paragraph in prose.split("\n\n"):
    lines = [line for line in paragraph.splitlines() if line.strip()]
    if lines and not lines[0].startswith(("|", "#")):
      assert len(lines) <= 8, f"a README paragraph of {len(lines)} lines: {lines[0]!r}"
