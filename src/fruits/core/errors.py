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


class ExpectedFailure(Exception):
    """A failure a person can meet and mend (a wrong setting, weights not to be had, no cluster up); its
    message names the setting or the file and says what to do. Commands print it as one line."""


class ConfigError(ExpectedFailure, ValueError):
    """A setting is missing or wrong; the message names it and says what to do."""


class NoCluster(ExpectedFailure, RuntimeError):
    """No cluster is recorded or reachable for a command that needs one."""


def check_region(setting: str, region: str | None) -> None:
    """The GDPR guard: refuse a region outside the EU, naming the setting."""
    if region is not None and region not in EU_REGIONS:
        raise ConfigError(f"{setting}={region} is outside the EU; GDPR requires one of {', '.join(EU_REGIONS)}")
