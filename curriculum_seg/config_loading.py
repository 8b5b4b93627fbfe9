"""Loading ml-collections config files and applying `--config.a.b=value` overrides strictly.

A config file is a Python file with `get_config(arg=None)`; `FILE:arg` passes `arg`. Overrides
must name an existing key and parse to the field's type; anything else is a `ConfigError` whose
one-line message names the key (with a suggestion for near misses).
"""

from __future__ import annotations

import ast
import difflib
import importlib.resources
import importlib.util
import os
from typing import Any, Iterable

import ml_collections


class ConfigError(ValueError):
  """A config file or override that cannot be used; the message names the file or key."""


def _resolve_path(path: str) -> str:
  if os.path.exists(path):
    return path
  if not os.path.isabs(path):  # fall back to the configs shipped with the package
    packaged = importlib.resources.files("configs").joinpath(os.path.basename(path))
    if packaged.is_file():
      return os.fspath(packaged)
  raise ConfigError(f"config file {path} does not exist")


def load_config_module(path: str) -> Any:
  """The Python module of config file `path` (resolved as `load_config_file` does)."""
  path = _resolve_path(path)
  module_spec = importlib.util.spec_from_file_location("_curriculum_seg_config", path)
  if module_spec is None or not path.endswith(".py"):
    raise ConfigError(f"config file {path} is not a Python file")
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # a broken config file is the user's input: report it in one line
    raise ConfigError(f"config file {path} failed to load: {type(e).__name__}: {e}") from e
  module.__file__ = path
  return module


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  module = load_config_module(path)
  path = module.__file__
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} has no get_config(arg=None) function")
  try:
    config = module.get_config(arg or None)
  except Exception as e:  # e.g. an unknown `file.py:arg`: the user's input, one line
    raise ConfigError(f"config file {spec}: get_config({arg or None!r}) failed: "
                      f"{type(e).__name__}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config file {path}: get_config returned {type(config).__name__}, "
                      "not a ConfigDict")
  return config


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(_all_keys(v, prefix + k + "."))
  return keys


def _parse_value(key: str, text: str, current: Any) -> Any:
  """Parses `text` to the type of the field's current value ('None' clears an optional
  number or tuple, e.g. model.foreground_prior, loss.class_weights)."""
  if text.strip() == "None" and isinstance(current, (float, tuple, list)):
    return None
  if isinstance(current, bool):
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ConfigError(f"config key {key} expects a bool (true/false), got {text!r}")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise ConfigError(f"config key {key} expects an int, got {text!r}") from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigError(f"config key {key} expects a float, got {text!r}") from None
  if isinstance(current, str):
    return text
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f"config key {key} is a group of settings; override its fields "
                      f"(e.g. --config.{key}.<field>=...)")
  try:  # tuples, lists, None-valued fields: a Python literal
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if current is None:
      return text
    raise ConfigError(f"config key {key} expects a {type(current).__name__} literal, "
                      f"got {text!r}") from None
  if current is not None and isinstance(current, (tuple, list)):
    if not isinstance(value, (tuple, list)):
      value = (value,)
    value = type(current)(value)
  return value


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Iterable[tuple[str, str]]) -> ml_collections.ConfigDict:
  """Applies (key, text) overrides such as ('data.image_size', '64') to a copy of `config`."""
  config = ml_collections.ConfigDict(config.to_dict(preserve_field_references=True))
  known = _all_keys(config)
  for key, text in overrides:
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        hint = difflib.get_close_matches(key, known, n=1)
        raise ConfigError(f"unknown config key {key}" +
                          (f" (did you mean {hint[0]}?)" if hint else ""))
      if i < len(parts) - 1:
        node = node[part]
    value = _parse_value(key, text, node[parts[-1]])
    try:
      with node.ignore_type():
        node[parts[-1]] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config key {key}: cannot set {text!r}: {e}") from e
  return config


STAGE_WILDCARD = "stages.*."


def expand_stage_wildcards(config: ml_collections.ConfigDict,
                           overrides: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
  """`stages.*.FIELD` overrides as one `stages.NAME.FIELD` override per stage of `config` that
  has FIELD (stages without it are left alone: a patch size means nothing to a whole stage);
  other overrides are kept as they are, in order."""
  out = []
  for key, value in overrides:
    if not key.startswith(STAGE_WILDCARD):
      out.append((key, value))
      continue
    field = key[len(STAGE_WILDCARD):]
    stages = config.get("stages", ml_collections.ConfigDict())
    out += [(f"stages.{name}.{field}", value) for name in stages.keys()
            if field.split(".")[0] in stages[name]]
  return out


def split_override_args(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Separates `--config.key=value` / `--config.key value` from the other arguments."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      body = arg[len("--config."):]
      if "=" in body:
        key, value = body.split("=", 1)
      elif i + 1 < len(argv):
        key, value = body, argv[i + 1]
        i += 1
      else:
        raise ConfigError(f"config override --config.{body} has no value")
      overrides.append((key, value))
    else:
      rest.append(arg)
    i += 1
  return rest, overrides
