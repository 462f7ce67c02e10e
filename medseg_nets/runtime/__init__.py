"""Run a bundle's network through another inference runtime (OpenVINO, ONNX Runtime) on CPU.

See :class:`RuntimeNetwork`.
"""

from .wrapper import RUNTIMES, RuntimeNetwork, available_runtimes, file_sha256

__all__ = ["RUNTIMES", "RuntimeNetwork", "available_runtimes", "file_sha256"]
