"""The library versions lmforge was tested with, checked at start-up with a one-line message.

pyproject.toml admits the same ranges (tests/test_scale_faults.py keeps the two equal); this check
catches an environment installed some other way (a cluster module, a shared conda env).
"""

from __future__ import annotations

import os
from importlib import metadata

from lmforge.errors import LmforgeError

TESTED = {
    "torch": ">=2.13,<2.14",
    "deepspeed": ">=0.19.8,<0.20",
    "transformers": ">=5.24,<5.25",
}
SKIP = "LMFORGE_SKIP_VERSION_CHECK"


def check_versions(installed: dict[str, str] | None = None) -> None:
    """Raise :class:`LmforgeError` naming the first package outside its tested range."""
    if os.environ.get(SKIP) == "1":
        return
    from packaging.specifiers import SpecifierSet

    for name, spec in TESTED.items():
        try:
            version = installed[name] if installed is not None else metadata.version(name)
        except (KeyError, metadata.PackageNotFoundError):
            raise LmforgeError(f"{name} is not installed: pip install '{name}{spec}'") from None
        if not SpecifierSet(spec, prereleases=True).contains(version, prereleases=True):
            raise LmforgeError(
                f"{name} {version} is installed, lmforge is tested with {name}{spec}: pip install '{name}{spec}' "
                f"(or set {SKIP}=1 to run untested versions at your own risk)"
            )
