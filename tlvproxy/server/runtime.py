"""What a request or session needs of the table it runs on.

Owns: the `TableRuntime` protocol, which `app.Runtime` satisfies, so that the
REST and WebSocket servers depend on its shape and not on the app.
Must not: hold state; a reload builds a new runtime (docs/operations.md "Reload").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Mapping

    from tlvproxy.auth.authenticators import Authenticators
    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.policy.waf import Waf
    from tlvproxy.server.traffic import CommandTraffic
    from tlvproxy.stores.limits import RateLimits
    from tlvproxy.upstream.pool import Pool


class TableRuntime(Protocol):
    """One loaded table with its upstream pools (by upstream name), policy,
    authenticators, and the traffic rules of the commands that have some (by
    command name)."""

    @property
    def table(self) -> CompiledTable: ...
    @property
    def pools(self) -> Mapping[str, Pool]: ...
    @property
    def limiter(self) -> RateLimits: ...
    @property
    def waf(self) -> Waf: ...
    @property
    def auth(self) -> Authenticators: ...
    @property
    def traffic(self) -> Mapping[str, CommandTraffic]: ...
