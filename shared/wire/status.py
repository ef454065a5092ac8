"""The wire's own message: a device's retained status (ARCHITECTURE §3, §7). Everything else
declares its messages beside the code that uses them (see `schema._MESSAGE_MODULES`).
"""

from __future__ import annotations

import enum

from fleetlearn.shared.wire.schema import Message, message, require, require_id


class Eligibility(enum.Enum):
    """Why a device may or may not join a cohort (ARCHITECTURE §7)."""

    ELIGIBLE = "eligible"
    BUSY = "busy"  # the machine it serves needs the CPU now
    LOW_BATTERY = "low_battery"
    OFFLINE = "offline"
    INFERENCE_ONLY = "inference_only"  # no labelled data: runs each release, never trains


@message("status")
class DeviceStatus(Message):
    """Retained on `fl/{fleet}/dev/{id}/status`; the last will is `online=False`."""

    device_id: str
    online: bool
    eligibility: Eligibility = Eligibility.ELIGIBLE
    charging: bool = False
    battery: float = 1.0  # fraction 0..1; mains-powered gateways report 1.0
    model_version: int = 0
    sdk_version: str = ""
    samples: int = 0  # local training examples available
    note: str = ""  # e.g. why the last release was refused
    # SHA-256 commitment to the device's current secret graph draw (shared.secagg.keys
    # .ticket_of), 16 bytes; empty when it has none (offline will, older devices). The
    # aggregator copies it into the announcement of a secure round; a new one follows each
    # round the device advertised in.
    ticket: bytes = b""
    # Secure asynchronous rounds: the model version of the trained update the device holds,
    # ready to be summed in a group (0: none).
    ready_version: int = 0

    def __post_init__(self) -> None:
        require_id(self.device_id, "device_id")
        require(len(self.ticket) in (0, 16), "ticket", "must be empty or 16 bytes")
        require(0.0 <= self.battery <= 1.0, "battery", f"{self.battery} is outside 0..1")
        require(self.model_version >= 0, "model_version", "must be >= 0")
        require(
            type(self.ready_version) is int and 0 <= self.ready_version < 2**31,
            "ready_version",
            "must be in 0..2^31-1",
        )
        require(self.samples >= 0, "samples", "must be >= 0")
        require(len(self.note) <= 512, "note", "longer than 512 characters")
