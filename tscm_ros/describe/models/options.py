"""Reading the option sections of model configs (config/model_*.yaml), with clear errors."""

from __future__ import annotations

from typing import Any

from tscm_ros.errors import ConfigError

REQUIRED = object()  # a default that marks a required option


def config_section(config: dict[str, Any], key: str, defaults: dict[str, Any], where: str) -> dict[str, Any]:
    """Return ``config[key]`` merged over ``defaults``; ConfigError on unknown or missing options.

    A default of ``REQUIRED`` marks a required option.
    """
    section = config.get(key, {})
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: '{key}' must be a mapping, got {section!r}")
    unknown = set(section) - set(defaults)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {sorted(unknown)} in '{key}'; allowed: {sorted(defaults)}")
    merged = {**defaults, **section}
    missing = [name for name, value in merged.items() if value is REQUIRED]
    if missing:
        raise ConfigError(f"{where}: '{key}' lacks required option(s) {missing}")
    return merged


def check_keys(config: dict[str, Any], allowed: set[str], where: str) -> None:
    """ConfigError naming the keys of ``config`` that are not in ``allowed``."""
    unknown = set(config) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
