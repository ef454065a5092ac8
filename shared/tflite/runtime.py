"""Which TFLite interpreter a device runs, found once: LiteRT, then tflite-runtime, then TF.

Rules it keeps (ARCHITECTURE §6): `ai_edge_litert` is the runtime a gateway installs
(`fleetlearn[device]`); `tflite_runtime` is accepted where it still works (its wheels are built
against numpy 1 and fail to import under numpy 2); TensorFlow's `tf.lite` is the last resort and
is imported only when nothing else is there, so a device never loads TensorFlow by accident.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from fleetlearn.shared.errors import FleetlearnError

log = logging.getLogger(__name__)

# (module to import, attribute holding the Interpreter class), in order of preference.
RUNTIMES: tuple[tuple[str, str], ...] = (
    ("ai_edge_litert.interpreter", "Interpreter"),
    ("tflite_runtime.interpreter", "Interpreter"),
    ("tensorflow.lite", "Interpreter"),
)

_found: tuple[str, Any] | None = None


class RuntimeMissingError(FleetlearnError):
    """No TFLite interpreter can be imported on this machine."""


def interpreter_class() -> tuple[str, Any]:
    """(module name, Interpreter class) of the first runtime that imports; cached."""
    global _found  # noqa: PLW0603 - one lookup per process; imports are slow and global anyway
    if _found is not None:
        return _found
    problems = []
    for module_name, attribute in RUNTIMES:
        try:
            module = importlib.import_module(module_name)
            cls = getattr(module, attribute)
        except ImportError as exc:
            problems.append(f"{module_name}: {exc}")
            continue
        except AttributeError as exc:
            # A tflite_runtime wheel built for numpy 1 gets this far under numpy 2 and then
            # fails on a missing numpy attribute; treat it as absent.
            problems.append(f"{module_name}: {exc}")
            continue
        if problems:
            log.info("using %s (unavailable: %s)", module_name, "; ".join(problems))
        _found = (module_name, cls)
        return _found
    raise RuntimeMissingError(
        "no TFLite runtime found: pip install 'fleetlearn[device]' (ai-edge-litert); tried "
        + "; ".join(problems)
    )


def new_interpreter(model: bytes, *, num_threads: int = 1) -> Any:
    """A fresh interpreter over `model`: it runs the variables' initializer on first use."""
    _, cls = interpreter_class()
    return cls(model_content=model, num_threads=num_threads)
