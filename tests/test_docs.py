"""The README and docs/ stay true: every config key documented with its real default, every command shown parses
with its script's own flags, every page has its contents list, every relative link resolves."""
import argparse
import importlib.util
import re
import shlex
import sys

import pytest
import yaml

from config import EVAL_SCHEMA, FINETUNE_SCHEMA, RAFT_SCHEMA, Key, load_recipe, validate_value
from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def key_table(page: str) -> dict[str, str]:
    """key -> the default cell of a `| `key` | `default` | meaning |` table (a section's keys as `section.key`)."""
    text = (ROOT / "docs" / page).read_text()
    return dict(re.findall(r"^\| `([a-z_0-9.]+)` \| (`[^|]*`|\(chat messages\)) \|", text, re.M))


def flattened(values: dict, schema: dict) -> list[tuple[str, object, Key]]:
    """(name, value, key) of every key, a section's keys as `section.key` (the section itself has no row)."""
    rows = []
    for name, value in values.items():
        key = schema[name]
        if key.fields is not None:
            rows += [(f"{name}.{field}", sub_value, key.fields[field]) for field, sub_value in value.items()]
        else:
            rows.append((name, value, key))
    return rows


def documented_value(cell: str, key: Key):
    """A table cell read as its config value would be (an int widened where the key takes a number; a required
    key's empty default is shown as it is)."""
    value = yaml.safe_load(cell.strip("`"))
    return cell if cell == "(chat messages)" else validate_value("docs", "cell", value, Key(key.kind))


@pytest.mark.parametrize("config, schema, page", [
    ("raft.yaml", RAFT_SCHEMA, "generation.md"), ("raft_eval_config.yaml", EVAL_SCHEMA, "evaluation.md")])
def test_every_config_key_is_documented_with_its_real_default(config, schema, page):
    shipped = flattened(yaml.safe_load((ROOT / config).read_text()), schema)
    table = key_table(page)
    assert set(table) == {name for name, _, _ in shipped}, f"docs/{page} and {config} list different keys"
    for name, value, key in shipped:
        prompt = isinstance(value, list) and bool(value) and isinstance(value[0], dict)      # chat messages
        expected = "(chat messages)" if prompt else validate_value(config, name, value, key)
        assert documented_value(table[name], key) == expected, f"docs/{page}: {name}"


def test_every_finetuning_key_is_documented_with_its_default():
    table = key_table("finetuning.md")
    assert set(table) == set(FINETUNE_SCHEMA)
    for name, key in FINETUNE_SCHEMA.items():
        assert documented_value(table[name], key) == key.default, f"docs/finetuning.md: {name}"


@pytest.mark.parametrize("recipe", sorted((ROOT / "finetune" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_each_recipe_is_valid_and_states_its_torchrun_command(recipe):
    settings = load_recipe(str(recipe), FINETUNE_SCHEMA, {})
    assert settings["model_name"]
    command = recipe.read_text().splitlines()[1]
    assert command.startswith("# torchrun ") and f"--config finetune/configs/{recipe.name}" in command
    script, argv = script_call(shlex.split(command[2:]))
    assert script == "finetune/finetuning.py" and parse_with_script(script, argv)


# ---- the commands shown --------------------------------------------------------------------------------------
SCRIPTS = ("raft.py", "raft_eval.py", "chat.py", "format.py", "finetune/finetuning.py",
           "finetune/checkpoint_converter.py", "finetune/embeddings.py")


def shown_commands() -> list[tuple[str, str]]:
    """(page, command) for every line of a ```bash block that runs one of the toolkit's scripts."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                tokens = shlex.split(line, comments=True)
                for part in split_on_operators(tokens):
                    if script_call(part)[0]:
                        found.append((page.name, shlex.join(part)))
    return found


def split_on_operators(tokens: list[str]) -> list[list[str]]:
    parts, current = [], []
    for token in tokens:
        if token in ("|", "&&", ";", "||"):
            parts.append(current)
            current = []
        else:
            current.append(token)
    return parts + [current]


def script_call(tokens: list[str]) -> tuple:
    """(the script, its arguments) of a command line, or (None, None)."""
    for i, token in enumerate(tokens):
        if token in SCRIPTS or re.fullmatch(r"bench/\w+\.py", token):
            return token, tokens[i + 1:]
    return None, None


class Parsed(Exception):
    pass


def parse_with_script(script: str, argv: list[str]) -> bool:
    """The script's own parse_args(argv) (with its checks, a recipe's keys included); for a script without one, its
    main() run until its argument parser has parsed argv (no work is done)."""
    spec = importlib.util.spec_from_file_location(f"shown_{script.replace('/', '_')[:-3]}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "parse_args"):
        return module.parse_args(argv) is not None
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(parser, args=None, namespace=None):
        original(parser, args, namespace)
        raise Parsed
    argparse.ArgumentParser.parse_args = parse_and_stop
    saved_argv, sys.argv = sys.argv, [script, *argv]      # a benchmark's main() reads sys.argv
    try:
        module.main(argv) if module.main.__code__.co_argcount else module.main()
    except Parsed:
        return True
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = saved_argv
    return False


def test_the_docs_show_commands():
    shown = shown_commands()
    assert len(shown) > 30
    scripts = {script_call(shlex.split(command))[0] for _, command in shown}
    assert set(SCRIPTS) <= scripts


@pytest.mark.parametrize("page, command", shown_commands())
def test_every_command_shown_parses_with_its_script(page, command, capsys):
    script, argv = script_call(shlex.split(command))
    try:
        assert parse_with_script(script, argv), f"{page}: {command}"
    except SystemExit:
        pytest.fail(f"{page}: {script} rejects: {command}\n{capsys.readouterr().err}")


def test_commands_that_need_gpus_say_so():
    for page in PAGES:
        for line in page.read_text().splitlines():
            if re.search(r"--nproc_per_node [48]\b|vllm serve|--tensor-parallel-size", line) and "```" not in line:
                if line.lstrip().startswith(("torchrun", "srun", "vllm", "python -m vllm")):
                    assert "# needs GPUs" in line, f"{page.name}: {line}"


# ---- the pages ------------------------------------------------------------------------------------------------
def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 26_000
    for part in ("## Contents", "make demo", "make test", "| stage | script | config | output |"):
        assert part in text


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def without_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_each_page_lists_its_contents(page):
    """Before its first section, a page lists every section (## heading) it has."""
    text = without_code(page.read_text())
    opening, _, rest = text.partition("\n## ")
    if opening.rstrip().endswith("Contents") or rest.startswith("Contents\n"):     # a "## Contents" heading
        opening = rest.split("\n## ", 1)[0]
    headings = [h for h in re.findall(r"^## (.+)$", text, re.M) if h != "Contents"]
    listed = set(re.findall(r"^- \[[^]]+\]\(#([^)]+)\)", opening, re.M))
    assert headings and {anchor(h) for h in headings} <= listed, f"{page.name} lists {listed}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target):
            assert (page.parent / target).exists(), f"{page.name} links to {target}"
    headings = {anchor(h) for h in re.findall(r"^#+ (.+)$", without_code(text), re.M)}
    for section in re.findall(r"\]\(#([^)]+)\)", text):
        assert section in headings, f"{page.name}: #{section}"
