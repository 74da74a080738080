"""`PolicyClient`: the client side of `craftvla serve` (and of any openpi policy server)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from craftvla.errors import CraftVLAError

from . import protocol


class PolicyClient:
    """A blocking websocket client: `infer(obs) -> {"actions": (H, A), "server_timing": {...}}`.

    `url` is "ws://host:port"; `metadata` holds what the server sent on connect. Use it as a
    context manager, or call `close()`. A server-side refusal raises CraftVLAError with its reason.
    """

    def __init__(self, url: str = "ws://127.0.0.1:8000", api_key: Optional[str] = None, timeout_s: float = 30.0):
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        try:
            self._connection = connect(
                url, compression=None, max_size=None, additional_headers=headers, open_timeout=timeout_s
            )
            self._ws = self._connection.__enter__()  # the connection's context, held until close()
        except InvalidStatus as err:
            raise CraftVLAError(
                f"{url}: the server refused the connection (HTTP {err.response.status_code}: "
                f"{err.response.body.decode(errors='replace').strip()})"
            ) from None
        except OSError as err:
            raise CraftVLAError(f"{url}: cannot connect ({err})") from None
        self.url = url
        self.metadata: dict[str, Any] = protocol.unpack(self._ws.recv())

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        from websockets.exceptions import ConnectionClosed

        try:
            self._ws.send(protocol.pack(obs))
            reply = self._ws.recv()
        except ConnectionClosed as err:
            raise CraftVLAError(f"{self.url}: connection closed ({err})") from None
        if isinstance(reply, str):  # the server's reason for refusing this request
            raise CraftVLAError(reply)
        return protocol.unpack(reply)

    def actions(self, obs: dict[str, Any]) -> np.ndarray:
        """Just the (H, A) action chunk."""
        return self.infer(obs)["actions"]

    def close(self) -> None:
        self._connection.__exit__(None, None, None)

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
