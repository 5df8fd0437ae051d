"""megatron-core availability, and the one fix it needs without Transformer Engine."""
from __future__ import annotations

import importlib.util

INSTALL_HINT = ('MegatronModel needs megatron-core 0.16.x (newer releases require Python 3.12): '
                'pip install "twinkle[megatron]"  (or: pip install "megatron-core>=0.16,<0.17" --no-deps, which '
                'keeps your torch)')


def megatron_available() -> bool:
    return importlib.util.find_spec('megatron') is not None and importlib.util.find_spec('megatron.core') is not None


def require_megatron() -> None:
    if not megatron_available():
        raise ImportError(INSTALL_HINT)
    try:
        import megatron.core  # noqa: F401
    except ImportError as exc:
        raise ImportError(f'{INSTALL_HINT}. Importing it failed: {exc}') from exc
    _patch_router_gemm()


def _patch_router_gemm() -> None:
    # megatron-core 0.16 imports ``te_general_gemm`` inside a try block and, without Transformer
    # Engine, leaves the name undefined; the MoE router then fails with NameError instead of using
    # its torch.mm fallback. Defining it as None selects that fallback.
    from megatron.core.transformer.moe import moe_utils
    if not hasattr(moe_utils, 'te_general_gemm'):
        moe_utils.te_general_gemm = None
