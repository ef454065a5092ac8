"""The embedded broker: amqtt (MQTT 3.1.1) with fleetlearn's password file and ACL.

It exists so that `pip install fleetlearn` alone runs the demo on a machine without mosquitto.
It enforces the same `passwd` ($7$ hashes) and `acl` files that `provision` writes for
mosquitto, through two small amqtt plugins. It lacks MQTT 5 and shared subscriptions and is
roughly half as fast as mosquitto, so production and load tests use mosquitto.

Run it as `python -m broker.embedded --host 127.0.0.1 --port 1883 [--passwd F --acl F]`; the
runner starts it that way, in its own process, like mosquitto.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from broker.acl import Access, Acl
from broker.provision import check_password

log = logging.getLogger("fleetlearn.broker.embedded")


class PasswdAuthPlugin(BaseAuthPlugin):
    """Accepts a CONNECT only with a username and password matching the mosquitto passwd file."""

    @dataclass
    class Config:
        password_file: str = ""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._hashes: dict[str, str] = {}
        for line in Path(self.config.password_file).read_text(encoding="utf-8").splitlines():
            user, sep, hashed = line.strip().partition(":")
            if sep:
                self._hashes[user] = hashed
        self._verified: dict[tuple[str, str], bool] = {}

    async def authenticate(self, *, session: Session) -> bool | None:
        user, password = session.username, session.password
        if not user or password is None:
            return False
        hashed = self._hashes.get(user)
        if hashed is None:
            return False
        key = (user, password)
        if key not in self._verified:
            # PBKDF2 costs ~1 ms; off the loop, and remembered so reconnect storms stay cheap.
            self._verified[key] = await asyncio.to_thread(check_password, password, hashed)
        return self._verified[key]


class AclTopicPlugin(BaseTopicPlugin):
    """Enforces a mosquitto ACL file on publish, subscribe and delivery."""

    @dataclass
    class Config:
        acl_file: str = ""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._acl = Acl.load(self.config.acl_file)

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        if session is None or topic is None:
            return False
        want = Access.WRITE if action == Action.PUBLISH else Access.READ
        return self._acl.allowed(session.username, session.client_id, topic, want)


@dataclass(slots=True)
class EmbeddedConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    password_file: Path | None = None
    acl_file: Path | None = None
    extra_plugins: dict[str, Any] = field(default_factory=dict)

    def amqtt_config(self) -> dict[str, Any]:
        plugins: dict[str, Any] = {}
        if self.password_file is not None:
            plugins["broker.embedded.PasswdAuthPlugin"] = {"password_file": str(self.password_file)}
        else:
            plugins["amqtt.plugins.authentication.AnonymousAuthPlugin"] = {"allow_anonymous": True}
        if self.acl_file is not None:
            plugins["broker.embedded.AclTopicPlugin"] = {"acl_file": str(self.acl_file)}
        plugins.update(self.extra_plugins)
        return {
            "listeners": {
                "default": {
                    "type": "tcp",
                    "bind": f"{self.host}:{self.port}",
                    "max_connections": 10_000,
                }
            },
            "plugins": plugins,
        }


async def serve(config: EmbeddedConfig, stop: asyncio.Event) -> None:
    broker = Broker(config.amqtt_config())
    await broker.start()
    print(f"embedded broker (amqtt) listening on {config.host}:{config.port}", flush=True)
    try:
        await stop.wait()
    finally:
        await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker.embedded")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--passwd", type=Path)
    parser.add_argument("--acl", type=Path)
    args = parser.parse_args(argv)
    # amqtt logs every packet at INFO; keep its chatter out of the fleet's output.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    config = EmbeddedConfig(
        host=args.host, port=args.port, password_file=args.passwd, acl_file=args.acl
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
