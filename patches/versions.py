"""Which megatron-core releases the patches were checked against, and the guard that enforces it.

Every patch in this package replaces a named piece of Megatron-Core. A release we have not
checked may have moved, renamed or fixed that piece, and a patch applied blindly could then
silently do the wrong thing. So the patches refuse to run on an unknown release unless the
user explicitly accepts the risk.
"""

import os
import warnings

# Release -> how it was checked. Add a release only after running tests/test_patches.py on it
# (or, for "call sites read", after reading every call site named in patches/README.md).
SUPPORTED_MEGATRON_CORE_VERSIONS = {
    "0.16.1": "checked: tests/test_patches.py passes (CPU, gloo, Python 3.11)",
}

ALLOW_UNTESTED_ENV = "MEGATRON_MEMORIZING_ALLOW_UNTESTED_MCORE"


def installed_megatron_core_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


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
        f"Install a checked release (pip install 'megatron-core==0.16.1'), or set "
        f"{ALLOW_UNTESTED_ENV}=1 to apply the patches anyway and verify the call sites listed "
        f"in patches/README.md yourself."
    )
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return version
    raise RuntimeError(message)
