"""Start a Ray worker node that stays on 127.0.0.1 (test-only launcher).

On Linux Ray rewrites 127.0.0.1 to the host's routable address and a joining node then binds every
interface; with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 it refuses to start instead. Pinning the two address
helpers to loopback before Ray's CLI runs keeps the whole node on 127.0.0.1.

Usage: python ray_loopback_node.py start --address=127.0.0.1:PORT --num-cpus=1 --block
"""

from __future__ import annotations

import sys


def _loopback(*_args: object, **_kwargs: object) -> str:
    return "127.0.0.1"


def main() -> None:
    import ray._private.services as services
    from ray.scripts import scripts

    original = services.resolve_ip_for_localhost

    def resolve(address: str) -> str:
        host = address.rsplit(":", 1)[0] if ":" in address else address
        if host in ("127.0.0.1", "localhost", ""):
            return address.replace("localhost", "127.0.0.1")
        return original(address)

    services.resolve_ip_for_localhost = resolve
    services.get_node_ip_address = _loopback
    sys.argv = ["ray", *sys.argv[1:]]
    scripts.main()


if __name__ == "__main__":
    main()
