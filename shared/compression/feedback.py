"""Error feedback: the device's memory of what it has not sent yet.

Owns `ErrorFeedback` (one per device and model) and `ResidualState`, its saved form (tag
`sparse.residual`). Guarantees, over any number of rounds: sum(sent) + residual == sum(updates)
up to float64 rounding, so lossy compression still converges. Trusts only bytes that decode as
a `ResidualState` for the right model size (else `wire.WireError` / `wire.ContextError`); the
caller stores the bytes.
"""

from __future__ import annotations

import numpy as np

from fleetlearn.shared import wire
from fleetlearn.shared.compression.codec import Compressed, compress
from fleetlearn.shared.compression.coordinates import MAX_DIM, _as_update
from fleetlearn.shared.compression.errors import CompressionError
from fleetlearn.shared.compression.messages import Compression, _require_dim


@wire.message("sparse.residual")
class ResidualState(wire.Message):
    """A device's error-feedback residual, as saved between restarts."""

    residual: np.ndarray
    rounds: int = 0

    def __post_init__(self) -> None:
        wire.require_array(self.residual, "ResidualState.residual", dtype="<f8", ndim=1)
        _require_dim(self.residual.shape[0], "ResidualState.residual")
        wire.require(
            bool(np.all(np.isfinite(self.residual))),
            "ResidualState.residual",
            "holds NaN or infinity",
        )
        wire.require(self.rounds >= 0, "ResidualState.rounds", "must be >= 0")


class ErrorFeedback:
    """The device's memory of what it has not sent yet (error feedback / error compensation).

    Each round: accumulated = residual + update; send compress(accumulated); residual =
    accumulated - sent, where `sent` is exactly what the aggregator decodes (so quantization and
    clipping error are carried too, not only the unsent coordinates). Hence, over any number of
    rounds, sum(sent) + residual == sum(updates) up to float64 rounding.

    `compress()` does all of it for the encoders here. When another layer does the quantizing
    (SecAgg scales by the FedAvg weight, clips and rounds itself), use the two halves:
    `accumulate(update)` gives residual + update, and `commit(sent)` takes the dense vector the
    aggregator will decode from what was actually sent, in the same units.
    If a round's update never reaches the sum (round aborted, device not a survivor), call
    `reclaim(sent)` to put it back. Persist with save()/load() across restarts.
    """

    __slots__ = ("_pending", "_residual", "rounds")

    def __init__(self, dim: int) -> None:
        if type(dim) is not int or not 1 <= dim <= MAX_DIM:
            raise CompressionError(f"dim must be an int in 1..{MAX_DIM}, got {dim!r}")
        self._residual = np.zeros(dim, dtype=np.float64)
        self._pending: np.ndarray | None = None
        self.rounds = 0

    @property
    def dim(self) -> int:
        return int(self._residual.shape[0])

    @property
    def residual(self) -> np.ndarray:
        """A read-only view of what is owed to the aggregator."""
        view = self._residual.view()
        view.flags.writeable = False
        return view

    def _check(self, vector: np.ndarray, name: str) -> np.ndarray:
        values = _as_update(vector)
        if values.shape[0] != self.dim:
            raise CompressionError(f"{name} has {values.shape[0]} parameters, expected {self.dim}")
        return values

    def accumulate(self, update: np.ndarray) -> np.ndarray:
        """residual + update (a new float64 array): what this round should try to send.

        Nothing changes until commit(); calling accumulate again replaces the pending sum.
        """
        self._pending = self._residual + self._check(update, "update")
        return self._pending.copy()

    def commit(self, sent: np.ndarray) -> None:
        """Keep accumulated - sent as the residual. `sent` is dense, in the update's units."""
        if self._pending is None:
            raise CompressionError("commit() without accumulate(): nothing is pending")
        self._residual = self._pending - self._check(sent, "sent")
        self._pending = None
        self.rounds += 1

    def compress(
        self,
        update: np.ndarray,
        config: Compression,
        *,
        rng: np.random.Generator,
        seed: bytes | None = None,
    ) -> Compressed:
        """Compress residual + update as `config` says and keep the rest for next round."""
        result = compress(self.accumulate(update), config, rng=rng, seed=seed)
        self.commit(result.sent)
        return result

    def reclaim(self, sent: np.ndarray) -> None:
        """Add back an update that was compressed but never applied by the aggregator."""
        self._residual = self._residual + self._check(sent, "sent")

    def save(self) -> bytes:
        """The residual as one wire payload, for the caller to store."""
        return wire.encode(ResidualState(residual=self._residual.copy(), rounds=self.rounds))

    @classmethod
    def load(cls, data: bytes | bytearray | memoryview, *, dim: int | None = None) -> ErrorFeedback:
        """Restore from save()'s bytes. Damaged or hostile bytes raise wire.WireError; a residual
        for a different model size (when `dim` is given) raises wire.ContextError."""
        state = wire.decode(data, ResidualState)
        if dim is not None and state.residual.shape[0] != dim:
            raise wire.ContextError(
                f"saved for {state.residual.shape[0]} parameters; the model has {dim}",
                field="ResidualState.residual",
            )
        restored = cls(int(state.residual.shape[0]))
        restored._residual = state.residual.astype(np.float64)  # writable copy
        restored.rounds = state.rounds
        return restored
