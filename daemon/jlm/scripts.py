"""The Lua scripts as Redis runs them: each file of `lua/`, with its declaration and preludes.

Every script starts with `prelude.lua` (history notes, server time); the scripts that record a
decision with `record.lua` (lookup, replay, save) and `schedule.lua` (manage's held jobs) next.
Before all of them, a Redis 7 shebang declares whether the script writes: at `maxmemory` Redis
then refuses a writing script whole before it runs (OOM, a passing cause), where an undeclared
script runs until its first refused write, and one whose first write frees memory (a `DEL`) may
write on past the limit.
"""

from __future__ import annotations

from importlib import resources

RECORDING = ("manage", "cancel", "invalidate")
READ_ONLY = ("status", "result")


def lua_file(name: str) -> str:
    """One file of `lua/`, as shipped in the package."""
    return resources.files("jlm").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def load_lua(name: str) -> str:
    """A script's text as loaded: its declaration (shebang), the preludes, then the script."""
    shebang = "#!lua flags=no-writes\n" if name in READ_ONLY else "#!lua\n"
    preludes = ("prelude", "record", "schedule") if name in RECORDING else ("prelude",)
    return shebang + "".join(lua_file(part) for part in (*preludes, name))
