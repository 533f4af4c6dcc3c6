"""Which megatron-core releases the patches were checked against, and the guard that enforces it.

Every patch in this package replaces a named piece of Megatron-Core. A release we have not
checked may have moved, renamed or fixed that piece, and a patch applied blindly could then
silently do the wrong thing. So the patches refuse to run on an unknown release unless the
user explicitly accepts the risk.
"""

import os
import warnings

from packaging.version import Version

# Release -> how it was checked. Add a release only after running the whole suite on it and
# reading every call site named in patches/README.md for it.
SUPPORTED_MEGATRON_CORE_VERSIONS = {
    "0.16.1": "checked: the whole test suite passes (CPU, gloo, Python 3.11, torch 2.13.0 CPU wheel; "
    "CI line py311, constraints/py311.txt)",
    "0.19.2": "checked: the whole test suite passes (CPU, gloo, Python 3.12, torch 2.13.0 CUDA wheel "
    "without a GPU; CI line py312, constraints/py312.txt); every call site in "
    "patches/README.md read",
}

ALLOW_UNTESTED_ENV = "MEGATRON_MEMORIZING_ALLOW_UNTESTED_MCORE"


def installed_megatron_core_version() -> str:
    """The installed release, e.g. "0.19.2".

    megatron-core 0.19 appends the short git hash of any repository it is installed inside
    ("0.19.2+4655d68" from a virtual environment within a project checkout): that local part
    names no release.
    """
    from megatron.core import package_info

    return Version(package_info.__version__).public


def check_megatron_core_version() -> str:
    """Returns the installed megatron-core version; raises if the patches were not checked on it.

    Setting ``MEGATRON_MEMORIZING_ALLOW_UNTESTED_MCORE=1`` turns the refusal into a warning.
    """
    version = installed_megatron_core_version()
    if version in SUPPORTED_MEGATRON_CORE_VERSIONS:
        return version
    message = (
        f"megatron-memorizing's CPU patches were not checked against the installed "
        f"megatron-core {version}; checked releases: "
        f"{', '.join(sorted(SUPPORTED_MEGATRON_CORE_VERSIONS))}. "
        f"Install a checked release (Python 3.11: pip install 'megatron-core==0.16.1'; Python "
        f">= 3.12: pip install 'megatron-core==0.19.2'), or set "
        f"{ALLOW_UNTESTED_ENV}=1 to apply the patches anyway and verify the call sites listed "
        f"in patches/README.md yourself."
    )
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return version
    raise RuntimeError(message)
