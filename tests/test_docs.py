"""Every command written in README.md and docs/*.md is accepted as written: its launcher's options
parse, its config file and `key=value` overrides load, its `accelerate launch` options exist; every
config setting quoted in the prose (`train.mixed_precision=no`, `logging.wandb: offline | ...`)
loads; every launcher answers --help. And `make test` does not touch the system (SLURM tests)."""
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mmvae.config import load_config, valid_keys

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = {p.stem: p for folder in ("launch", "benchmarks") for p in (ROOT / folder).glob("*.py")}
LAUNCHERS = sorted(SCRIPTS)
# Placeholders the docs write in upper case, as the values a reader would type.
PLACEHOLDERS = {"K": "50", "C": "10", "N": "2", "SECONDS": "600"}
KEY = "|".join(re.escape(k) for k in valid_keys())


def script(name: str):
    """launch/<name>.py or benchmarks/<name>.py as a module (neither folder is a package)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launcher(name: str):
    """The module holding a command's parse_args and main: mmvae.cli.<name> for the commands,
    the script itself for the benchmarks and gpu_check."""
    if (ROOT / "mmvae" / "cli" / f"{name}.py").is_file():
        return importlib.import_module(f"mmvae.cli.{name}")
    return script(name)


def _code(text: str) -> list[str]:
    """Command lines: the lines of ```bash blocks (continuations joined) and inline code spans."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]
    return lines


def _expand(line: str) -> list[list[str]]:
    """Tokens of one line, once per alternative: `[opt]` kept, `[key=value ...]` dropped,
    `a|b|c` one command each, a `...` placeholder dropped with the option naming it."""
    line = re.sub(r"\[([^\[\]]*)\]", lambda m: "" if "..." in m.group(1) else m.group(1), line)
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return []
    out = []
    for i, token in enumerate(tokens):
        if token == "...":
            if out and out[-1].startswith("--"):
                out.pop()
            continue
        out.append(token)
    choices = [i for i, t in enumerate(out) if "|" in t and not t.startswith("|")]
    if not choices:
        return [out]
    i = choices[0]
    return [cmd for alt in out[i].split("|")
            for cmd in _expand(shlex.join(out[:i] + [alt] + out[i + 1:]))]


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, tokens) of every command that runs a launcher (python, accelerate launch, sbatch)."""
    found = []
    for doc in DOCS:
        for line in _code(doc.read_text()):
            if not re.search(r"\b(python|accelerate|sbatch)\b.*\b(launch|benchmarks)/\S+\.(py|sbatch)",
                             line):
                continue  # a file named in prose, not a command
            for tokens in _expand(line):
                found.append((f"{doc.name}: {line.strip()[:80]}", tokens))
    return found


COMMANDS = documented_commands()


def _placeholders(args: list[str]) -> list[str]:
    return [re.sub(r"=([A-Z]+)$", lambda m: "=" + PLACEHOLDERS.get(m.group(1), m.group(1)), a)
            for a in args]


def check_command(tokens: list[str]) -> None:
    at = next(i for i, t in enumerate(tokens) if re.search(r"(launch|benchmarks)/\S+\.(py|sbatch)$", t))
    before, path, args = tokens[:at], tokens[at], _placeholders(tokens[at + 1:])
    if "launch" in before and "accelerate" in before:  # accelerate's own options exist
        from accelerate.commands.launch import launch_command_parser

        start = before.index("launch") + 1
        launch_command_parser().parse_args([*before[start:], "x.py"])
    name = Path(path).stem
    if path.endswith(".sbatch"):  # everything after the script goes to launch/train.py
        name = "train"
    module = launcher(name)
    parsed = module.parse_args(args)
    if name == "train":
        # a run folder's config.yaml (e.g. an imported model) exists only after that run: the
        # overrides are still checked, against the defaults
        config = None if parsed.config and parsed.config.startswith("runs/") else parsed.config
        load_config(config, parsed.overrides)
    elif name == "bench":
        load_config(None, module.DEFAULTS + parsed.overrides)
    elif name in ("evaluate", "bench_eval"):
        load_config(None, parsed.overrides)
        from mmvae.eval.metrics import METRICS

        for metric in (getattr(parsed, "metrics", None) or "").split(","):
            assert not metric or metric in METRICS, metric


def test_the_docs_hold_commands_of_every_kind():
    kinds = {Path(next(t for t in tokens if re.search(r"(launch|benchmarks)/", t))).name
             for _, tokens in COMMANDS}
    assert {"train.py", "evaluate.py", "shard_demo.py", "shard_mnist_svhn.py", "shard_cub.py",
            "bench.py", "bench_cub.py", "bench_data.py", "train.sbatch",
            "train_multinode.sbatch"} <= kinds
    assert any("accelerate" in tokens for _, tokens in COMMANDS)


@pytest.mark.parametrize("tokens", [t for _, t in COMMANDS], ids=[w for w, _ in COMMANDS])
def test_documented_command_is_accepted(tokens, monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' paths are relative to the checkout
    try:
        check_command(tokens)
    except SystemExit as exit_:  # argparse refused it (exit 0 only for --help-style commands)
        assert exit_.code == 0, shlex.join(tokens)


def documented_settings() -> list[tuple[str, list[str]]]:
    """Config settings quoted in prose: `a.b=v ...` overrides and `a.b: v | w` choices."""
    found = []
    for doc in DOCS:
        for span in _code(doc.read_text()):
            span = span.strip()
            if re.fullmatch(rf"(?:(?:{KEY})=\S*\s*)+", span):
                found.append((f"{doc.name}: {span}", _placeholders(span.split())))
            elif m := re.fullmatch(rf"({KEY}):\s*(.+)", span):
                for value in m.group(2).split("|"):
                    found.append((f"{doc.name}: {span}", [f"{m.group(1)}={value.strip()}"]))
    return found


SETTINGS = documented_settings()


def test_the_docs_quote_settings():
    assert ["train.mixed_precision=no"] in [s for _, s in SETTINGS]  # README: the caption demo
    assert len(SETTINGS) > 10


@pytest.mark.parametrize("overrides", [s for _, s in SETTINGS], ids=[w for w, _ in SETTINGS])
def test_documented_setting_loads(overrides):
    overrides = [o.replace("=...", "=x") if o.startswith("run.") else o for o in overrides]
    load_config(None, overrides)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_answers_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        launcher(name).main(["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "mmvae" / "cli").glob("[!_]*.py")))
def test_each_command_has_its_launch_script_running_its_main(name):
    """`python launch/<name>.py` runs `mmvae.cli.<name>.main`: the thin entry point is wired to
    the command it names (the documented commands go through it)."""
    assert SCRIPTS[name].parent.name == "launch"
    assert script(name).main is importlib.import_module(f"mmvae.cli.{name}").main


def test_slurm_tests_are_skipped_unless_asked_for(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "MMVAE_TEST_SLURM")}
    env["MMVAE_SLURM_STATE"] = str(tmp_path / "slurm")  # where slurm_local.sh would write
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/test_slurm.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"\d+ skipped", proc.stdout) and "passed" not in proc.stdout, proc.stdout
    assert "set MMVAE_TEST_SLURM=1" in proc.stdout
    assert not (tmp_path / "slurm").exists()
