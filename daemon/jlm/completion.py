"""Shell completion scripts (`jlm completion bash|zsh|fish`), generated from the parser."""

from __future__ import annotations

import argparse
import shlex

SHELLS = ("bash", "zsh", "fish")


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help(parser: argparse.ArgumentParser, name: str) -> str:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if choice.dest == name:
                    return choice.help or ""
    return ""


def _options(sub: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in sub._actions if a.option_strings and a.help != argparse.SUPPRESS]


def _positional_choices(sub: argparse.ArgumentParser) -> list[str]:
    return [str(c) for a in sub._actions if not a.option_strings and a.choices for c in a.choices]


def bash(parser: argparse.ArgumentParser, prog: str = "jlm") -> str:
    commands = _commands(parser)
    cases = []
    for name, sub in commands.items():
        words = [s for a in _options(sub) for s in a.option_strings] + _positional_choices(sub)
        cases.append(f"        {name}) opts={shlex.quote(' '.join(words))} ;;")
        for a in _options(sub):
            if a.choices:
                values = shlex.quote(" ".join(str(c) for c in a.choices))
                for s in a.option_strings:
                    cases.append(
                        f'        {name}:{s}) COMPREPLY=($(compgen -W {values} -- "$cur")); '
                        "return ;;"
                    )
    fn = f"_{prog}_complete"
    return "\n".join(
        [
            f"# bash completion for {prog}: source <({prog} completion bash)",
            f"{fn}() {{",
            '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" opts=""',
            '    if [ "$COMP_CWORD" -eq 1 ]; then',
            f'        COMPREPLY=($(compgen -W {shlex.quote(" ".join(commands))} -- "$cur"))',
            "        return",
            "    fi",
            '    case "${COMP_WORDS[1]}:$prev" in',
            *[c for c in cases if ":" in c.split(")")[0]],
            "    esac",
            '    case "${COMP_WORDS[1]}" in',
            *[c for c in cases if ":" not in c.split(")")[0]],
            "    esac",
            '    COMPREPLY=($(compgen -W "$opts" -- "$cur"))',
            "}",
            f"complete -F {fn} {prog}",
            "",
        ]
    )


def zsh(parser: argparse.ArgumentParser, prog: str = "jlm") -> str:
    """zsh runs the bash script through its bashcompinit layer."""
    return "\n".join(
        [
            f"#compdef {prog}",
            f"# zsh completion for {prog}: source <({prog} completion zsh)",
            "if ! (( $+functions[compdef] )); then autoload -U +X compinit && compinit; fi",
            "autoload -U +X bashcompinit && bashcompinit",
            bash(parser, prog),
        ]
    )


def fish(parser: argparse.ArgumentParser, prog: str = "jlm") -> str:
    commands = _commands(parser)
    lines = [
        f"# fish completion for {prog}: {prog} completion fish | source",
        f"complete -c {prog} -f",
    ]
    for name, sub in commands.items():
        lines.append(
            f"complete -c {prog} -n __fish_use_subcommand -a {name} "
            f"-d {shlex.quote(_help(parser, name))}"
        )
        seen = f"'__fish_seen_subcommand_from {name}'"
        for choice in _positional_choices(sub):
            lines.append(f"complete -c {prog} -n {seen} -a {choice}")
        for a in _options(sub):
            longs = [s[2:] for s in a.option_strings if s.startswith("--")]
            shorts = [s[1:] for s in a.option_strings if not s.startswith("--")]
            flags = " ".join([f"-l {s}" for s in longs] + [f"-s {s}" for s in shorts])
            values = ""
            if a.choices:
                values = " -xa " + shlex.quote(" ".join(str(c) for c in a.choices))
            elif a.nargs != 0:
                values = " -r"
            lines.append(
                f"complete -c {prog} -n {seen} {flags}{values} -d {shlex.quote(a.help or '')}"
            )
    return "\n".join(lines) + "\n"


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    return {"bash": bash, "zsh": zsh, "fish": fish}[shell](parser)
