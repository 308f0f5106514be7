"""The README's commands must not rot: every script, module, flag, config key and environment variable
they use exists. (The two main commands run for real: scripts/demo.sh in tests/test_demo.py, and
scripts/test.sh is what runs this file.)"""
import importlib
import re
import shlex
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

from utils.defaults import get_cfg

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands() -> list[str]:
    """Shell commands of the README's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                commands.append(line)
    return commands


COMMANDS = _commands()


def _target(tokens: list[str]) -> tuple[str, list[str]]:
    """(program, its arguments) for `VAR=x ... bash|python|./script ...` commands."""
    while tokens and re.match(r"^[A-Z_]+=", tokens[0]):
        tokens = tokens[1:]
    if tokens[0] in ("bash", "sbatch"):
        return tokens[1], tokens[2:]
    if tokens[0] == "python" and tokens[1] == "-m":
        return tokens[2], tokens[3:]
    if tokens[0] == "python":
        return tokens[1], tokens[2:]
    return tokens[0], tokens[1:]


@lru_cache(maxsize=None)
def _help(program: str) -> str:
    """The help of a program's get_args_parser(), built in this process (a `--help` subprocess per program would
    import torch again for each)."""
    return importlib.import_module(program.removesuffix(".py")).get_args_parser().format_help()


@lru_cache(maxsize=None)
def _flags(program: str) -> set[str]:
    """The option strings a program's --help lists (the `  -x, --flag VALUE` lines; not flags its help prose
    mentions, and not a prefix of a longer flag)."""
    lines = [line[2:].split("  ")[0] for line in _help(program).splitlines() if re.match(r"^  -", line)]
    return {flag for line in lines for flag in re.findall(r"(?<![\w-])--[\w-]+", line)}


# Scripts forward their arguments to these programs.
FORWARDS = {"scripts/train.sh": "train_ssl.py", "scripts/train_paper.sh": "train_ssl.py",
            "scripts/slurm_train.sh": "train_ssl.py", "scripts/eval_knn.sh": "eval_knn.py",
            "scripts/eval_linear.sh": "eval_linear.py", "scripts/finetune.sh": "eval_finetune.py"}


def test_readme_has_the_two_main_commands():
    assert "bash scripts/demo.sh" in COMMANDS[0] and "bash scripts/test.sh" in COMMANDS[1]


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_is_valid(command):
    tokens = shlex.split(command)
    if tokens[0] == "pip":
        for arg in tokens[2:]:
            if not arg.startswith("-"):
                assert (ROOT / arg).is_file(), arg
        return
    program, args = _target(tokens)
    program = program.removeprefix("./")
    if program.endswith(".sh"):
        script = ROOT / program
        assert script.is_file(), program
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        text = script.read_text()
        if '"$HERE/train.sh"' in text:  # train_paper.sh hands its environment to train.sh
            text += (ROOT / "scripts/train.sh").read_text()
        for var in re.findall(r"(?:^|\s)([A-Z_]+)=", command):
            assert var in text, f"{program} does not read ${var}"
        if program not in FORWARDS:  # demo.sh / test.sh: run for real elsewhere
            return
        program = FORWARDS[program]
    keys = set()
    in_opts = False
    for arg in args:
        if arg == "--opts":
            in_opts = True
        elif in_opts and re.match(r"^[A-Z_]+\.[A-Z_]+$", arg):
            keys.add(arg)
        elif arg.startswith("--"):
            assert arg in _flags(program), f"{program} has no {arg}"
    cfg = get_cfg()
    for key in keys:
        node, name = key.split(".")
        assert name in cfg[node], f"unknown config key {key}"


def test_readme_config_keys_exist():
    cfg = get_cfg()
    for key in set(re.findall(r"\b(DATA|MODEL|TIMESFORMER|TEST)\.([A-Z_]+)\b", README)):
        assert key[1] in cfg[key[0]], ".".join(key)


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces to hyphens)."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_readme_links_exist():
    """Links to files exist, and their `#anchor`s (and the README's own) name a heading there."""
    for target in re.findall(r"\]\(((?!https?:)[^)]+)\)", README):
        path, _, anchor = target.partition("#")
        assert not path or (ROOT / path).exists(), target
        if anchor:
            assert anchor in _anchors((ROOT / path).read_text() if path else README), target


def test_no_library_module_imports_an_entry_script():
    """README "Layout": the modules of models/, datasets/ and utils/ import none of the scripts at the root."""
    scripts = {p.stem for p in ROOT.glob("*.py")}
    for module in [p for folder in ("models", "datasets", "utils") for p in (ROOT / folder).rglob("*.py")]:
        imported = set(re.findall(r"^\s*(?:from|import)\s+(\w+)", module.read_text(), flags=re.M))
        assert not imported & scripts, f"{module.relative_to(ROOT)} imports {sorted(imported & scripts)}"


def test_layout_names_every_source_file():
    """README "Layout" names every module and script (a file of a subfolder such as datasets/preprocessing/ may be
    named by its folder), so a new file gets its line there."""
    layout = re.search(r"## Layout\n.*?```\n(.*?)```", README, flags=re.S).group(1)
    files = [*ROOT.glob("*.py"), *ROOT.glob("*.sh")]
    files += [p for folder in ("models", "datasets", "utils", "scripts", "benchmarks") for ext in ("py", "sh")
              for p in (ROOT / folder).rglob(f"*.{ext}") if p.name != "__init__.py"]
    missing = [str(p.relative_to(ROOT)) for p in files
               if p.name not in layout and not (p.parent.parent != ROOT and f"{p.parent.name}/" in layout)]
    assert not missing, f"README Layout does not name {missing}"


# Flags the README names that are not svt's: torchrun's, SLURM's and pytest's, and one it names as removed.
OTHER_FLAGS = {"--nproc_per_node", "--standalone", "--master_port", "--cpus-per-task", "--signal", "--requeue",
               "--pdb", "--use_flow"}


def test_every_flag_the_readme_names_is_a_programs():
    """Every `--flag` in the README's prose too (not only its commands) is one that some svt program's
    `add_argument` declares."""
    declared = {"--help"}
    for path in [*ROOT.glob("*.py"), *(p for folder in ("datasets", "utils", "scripts", "benchmarks")
                                       for p in (ROOT / folder).rglob("*.py"))]:
        for names in re.findall(r"""add_argument\(\s*((?:["']--[\w-]+["'],\s*)+)""", path.read_text()):
            declared |= set(re.findall(r"--[\w-]+", names))
    unknown = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", README)) - declared - OTHER_FLAGS
    assert not unknown, f"no svt program has {sorted(unknown)}"
