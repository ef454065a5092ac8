"""netem in user space, for kernels without sch_netem (used by tests/netem.py).

    ip netns exec NS python tests/netem_shuttle.py --name fld1 --host-fd 5 \
        --delay 0.3 --jitter 0.1 --loss 0.02 [--seed 1]

Run inside the namespace, it creates the TUN device `--name` there and moves IP packets
between it and the TUN device whose descriptor it inherited from the other side (`--host-fd`).
Each packet, in each direction, is dropped with probability `--loss`, else written to the
other side after `--delay` +/- `--jitter` seconds (uniform, packets may overtake each other),
as `tc qdisc ... netem delay D J loss L` does. Prints "ready" once its device exists; stops
on SIGTERM or when its stdin closes (the test that started it is gone).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import random
import signal
import struct
import sys

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_MTU_READ = 65_535


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


async def _main(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    inner = _open_tun(args.name)
    outer = args.host_fd
    os.set_blocking(outer, False)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def parent_gone() -> None:
        if not os.read(sys.stdin.fileno(), 1):  # EOF: the pipe from the test closed
            stop.set()

    loop.add_reader(sys.stdin.fileno(), parent_gone)

    def write(fd: int, packet: bytes) -> None:
        try:
            os.write(fd, packet)
        except OSError:
            pass  # the device is going away, or its queue is full: the packet is lost

    def forward(src: int, dst: int) -> None:
        while True:
            try:
                packet = os.read(src, _MTU_READ)
            except BlockingIOError:
                return
            except OSError:
                stop.set()
                return
            if rng.random() < args.loss:
                continue
            hold = max(0.0, args.delay + rng.uniform(-args.jitter, args.jitter))
            loop.call_later(hold, write, dst, packet)

    loop.add_reader(inner, forward, inner, outer)
    loop.add_reader(outer, forward, outer, inner)
    print("ready", flush=True)
    await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--host-fd", type=int, required=True)
    parser.add_argument("--delay", type=float, required=True)
    parser.add_argument("--jitter", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
