"""`jlm check-config`: every setting with its value (passwords hidden) and where it came from."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

import orjson

from jlm.cli.output import EX_OK

if TYPE_CHECKING:
    from jlm.config import Loaded, Settings


def check_config(loaded: Loaded, args: argparse.Namespace) -> int:
    """Every setting with its value (passwords hidden) and where it came from."""
    from jlm.config import redact_url, unknown_variable

    values = _setting_values(loaded.settings)
    if args.json:
        info: dict[str, Any] = dict(values)
        info["amqp_urls"] = [redact_url(u) for u in loaded.settings.amqp_urls]
        info["sources"] = {
            key: {"source": source.kind, "origin": source.origin}
            for key, source in loaded.sources.items()
        }
        info["ignored"] = list(loaded.ignored)
        info["warnings"] = [unknown_variable(name) for name in loaded.ignored]
        print(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode())
        return EX_OK
    rows = _text_rows(values)
    width = max(len(label) for _, label, _ in rows)
    for key, label, value in rows:
        source = loaded.sources[key]
        origin = f"  ({source.origin})" if source.kind in ("file", "credential") else ""
        print(f"{label:<{width}}  {source.kind:<10}  {_shown(value)}{origin}")
    for name in loaded.ignored:
        print(f"jlm: warning: {unknown_variable(name)}", file=sys.stderr)
    print("configuration OK")
    return EX_OK


def _text_rows(values: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(setting, label, value): the environment's settings by variable name, the file's keys by
    name, with one row per job type (`job_types."a"`) and per grant (`auth.users."u"`)."""
    from jlm.config import ENV_SETTINGS, env_name

    rows: list[tuple[str, str, Any]] = []
    for key, value in values.items():
        if key in ENV_SETTINGS:
            rows.append((key, env_name(key), value))
        elif key == "job_types" and value:
            rows += [(key, f'job_types."{name}"', item) for name, item in value.items()]
        elif key == "auth":
            for sub, item in value.items():
                if sub == "users" and item:
                    rows += [(key, f'auth.users."{user}"', grant) for user, grant in item.items()]
                else:
                    rows.append((key, f"auth.{sub}", item))
        else:
            rows.append((key, key, value))
    return rows


def _setting_values(settings: Settings) -> dict[str, Any]:
    """Each setting by name as JSON, passwords hidden: the environment's, then the file's."""
    from jlm.config import ENV_SETTINGS, FileConfig

    values = {name: _json_value(getattr(settings, name)) for name in ENV_SETTINGS}
    f = settings.file
    for key in FileConfig.model_fields:
        if key == "job_types":
            values[key] = {
                k: v.model_dump(mode="json") | {"queue": f.queue_for(k)}
                for k, v in f.job_types.items()
            }
        else:
            values[key] = _json_value(getattr(f, key))
    return values


def _json_value(value: Any) -> Any:
    from pydantic import BaseModel

    from jlm.config import redact_url

    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, str):
        return redact_url(value)
    if value is None or isinstance(value, bool | int | float | dict | list):
        return value
    return str(value)


def _shown(value: Any) -> str:
    """A value as text: booleans as in the environment, tables as compact JSON."""
    from jlm.config import redact_url

    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return redact_url(orjson.dumps(value).decode())
    return redact_url(str(value))
