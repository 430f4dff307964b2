"""Where the public data lives.

The traces and reference profiles are public data under their own licences; they are read in place
and never copied into the project (DESIGN.md section 6). Resolution order:

* traces: ``$OPSCALE_DATA``, else ``../shared/traces`` beside the checkout, else ``./shared/traces``
  or ``../shared/traces`` relative to the working directory;
* reference profiles: ``$OPSCALE_REFERENCE``, else ``../shared/reference`` found the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

_CHECKOUT_ROOT = Path(__file__).resolve().parent.parent


def _candidates(sub: str) -> list[Path]:
    cwd = Path.cwd()
    return [
        _CHECKOUT_ROOT.parent / "shared" / sub,
        cwd / "shared" / sub,
        cwd.parent / "shared" / sub,
    ]


def _resolve(env_var: str, sub: str) -> Path:
    override = os.environ.get(env_var)
    if override:
        return Path(override).expanduser()
    for candidate in _candidates(sub):
        if candidate.is_dir():
            return candidate
    return _candidates(sub)[0]


def data_dir() -> Path:
    """Directory holding the public traces (may not exist; callers report where they looked)."""
    return _resolve("OPSCALE_DATA", "traces")


def reference_dir() -> Path:
    """Directory holding ``vidur_profiles/`` and ``splitwise_sim_perf_model/``."""
    return _resolve("OPSCALE_REFERENCE", "reference")


def searched_locations(env_var: str, sub: str) -> str:
    """Human-readable list of the places :func:`data_dir` / :func:`reference_dir` looked, for errors."""
    override = os.environ.get(env_var)
    if override:
        return f"${env_var}={override}"
    return ", ".join([f"${env_var} (unset)"] + [str(p) for p in _candidates(sub)])
