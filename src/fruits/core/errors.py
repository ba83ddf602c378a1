"""The leaf every layer stands on: the error a wrong setting raises, and the GDPR region guard.

It imports nothing of the package, so any module (config, storage, the engines, aws) can refuse a
setting without importing config, and no circle forms.
"""

from __future__ import annotations

# GDPR: data stays in the EU. Every AWS client takes its region from the config, checked here.
EU_REGIONS = (
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "eu-central-1",
    "eu-central-2",
    "eu-north-1",
    "eu-south-1",
    "eu-south-2",
)


class ConfigError(ValueError):
    """A setting is missing or wrong; the message names it and says what to do."""


def check_region(setting: str, region: str | None) -> None:
    """The GDPR guard: refuse a region outside the EU, naming the setting."""
    if region is not None and region not in EU_REGIONS:
        raise ConfigError(f"{setting}={region} is outside the EU; GDPR requires one of {', '.join(EU_REGIONS)}")
