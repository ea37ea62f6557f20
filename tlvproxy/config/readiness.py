"""Reading the `readiness` section (docs/configuration.md, docs/operations.md
"Readiness"): the upstreams that must have a healthy node for /readyz to
answer 200.

Owns: what `readiness` accepts, and its one cross-reference: each upstream it
names is one of the table's.
Must not: look at health (the admin listener asks the pools), or stop at the
first problem: every problem is recorded on the `NodeReader`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tlvproxy.config import nodes
from tlvproxy.config.model import Readiness
from tlvproxy.config.nodes import join, suggest

if TYPE_CHECKING:
    from collections.abc import Mapping

    from tlvproxy.config.model import UpstreamSpec
    from tlvproxy.config.nodes import Node, NodeReader


def read_readiness(
    r: NodeReader, node: Node | None, upstreams: Mapping[str, UpstreamSpec]
) -> Readiness:
    """The `readiness` section; the defaults when it is absent or unusable (recorded)."""
    if node is None:
        return Readiness()
    found = r.mapping(node, "readiness", ("require_healthy_upstreams",))
    if found is None or "require_healthy_upstreams" not in found:
        return Readiness()
    path = "readiness.require_healthy_upstreams"
    names: list[str] = []
    for j, item in enumerate(r.sequence(found["require_healthy_upstreams"], path) or []):
        name = r.value(item, join(path, j), nodes.text, "")
        if name and name not in upstreams:
            known = ", ".join(upstreams) or "none"
            r.error(
                item,
                join(path, j),
                f"undefined upstream {name!r} (defined: {known})" + suggest(name, upstreams),
            )
        elif name:
            names.append(name)
    return Readiness(require_healthy_upstreams=tuple(names))
