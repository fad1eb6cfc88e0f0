"""Start-up reads: what is on each leg, and whether another client holds it.

`examine_leg` reads a leg's header slots and says what it found
(`history.LegFinding`); `wait_for_holder` enforces the one-writer rule
before anything is written: a storage whose newest header names another
client that has not shut down is refused while that client's heartbeat
advances, and taken over (with a warning) once it has stood still for
`holder_timeout`. Neither writes anything; the mirror acts on the result.
Once the mount has decided to write, `take_write_grants` makes the nodes
fence whoever wrote before (docs/mirror-metadata.md section 7).
"""

from __future__ import annotations

import logging
import time

import trio

from ..errors import NodeError, UserError
from ..fanout import gather
from .history import LegFinding
from .legs import MirrorLeg
from .metadata import BLOCK, DamagedMetadata, MetadataError, NoMetadata, UnsupportedVersion
from .options import MirrorOptions

log = logging.getLogger(__name__)


def format_time(microseconds: int) -> str:
    if not microseconds:
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(microseconds / 1e6))


async def examine_leg(leg: MirrorLeg) -> LegFinding:
    """What leg `leg` holds. Unreachable or tiny legs and unreadable
    metadata are findings, not errors; metadata of a newer format is a
    UserError (it must not be overwritten by this version)."""
    if not leg.online or leg.size < 2 * BLOCK:
        reason = "offline" if not leg.online else f"too small ({leg.size} bytes)"
        return LegFinding(leg.index, reachable=leg.online, problem=reason)
    try:
        header = await leg.read_header()
    except NoMetadata:
        return LegFinding(leg.index, reachable=True, problem="no mirror metadata")
    except UnsupportedVersion as exc:
        raise UserError(f"{leg}: {exc}; use a newer dstfuse") from None
    except DamagedMetadata as exc:
        return LegFinding(leg.index, reachable=True, problem=f"metadata damaged ({exc})")
    except NodeError as exc:
        log.warning("%s: cannot read its metadata: %s", leg, exc)
        return LegFinding(leg.index, reachable=False, problem=str(exc))
    if header.leg_size != leg.size:
        return LegFinding(
            leg.index,
            reachable=True,
            problem=f"leg size changed from {header.leg_size} to {leg.size} bytes",
        )
    return LegFinding(leg.index, reachable=True, header=header)


async def wait_for_holder(
    storage_name: str,
    legs: list[MirrorLeg],
    findings: list[LegFinding],
    options: MirrorOptions,
) -> bool:
    """Enforce the one-writer rule. Raises UserError naming the holder while
    its heartbeat advances; returns True if the holder shut down while we
    watched (examine the legs again), False to go on: not held, `force`,
    or the holder's heartbeat stood still for `holder_timeout` (a crash)."""
    headers = [f.header for f in findings if f.header is not None]
    if not headers:
        return False
    newest = max(header.generation for header in headers)
    held = [
        f
        for f in findings
        if f.header is not None
        and f.header.generation == newest
        and f.header.held
        and f.header.client_id != options.client_id
    ]
    if not held:
        return False
    holder = held[0].header
    assert holder is not None
    who = f"{holder.client_name or 'an unnamed client'} since {format_time(holder.held_since_us)}"
    if options.force:
        log.warning("storage %s: taking over from %s (force)", storage_name, who)
        return False
    log.info("storage %s: held by %s; watching its heartbeat", storage_name, who)
    baseline = {f.index: f.header.heartbeat for f in held if f.header is not None}
    deadline = trio.current_time() + options.holder_timeout
    step = max(0.05, min(0.5, options.heartbeat_interval / 2))
    while trio.current_time() < deadline:
        await trio.sleep(step)
        for finding in held:
            try:
                now = await legs[finding.index].read_header()
            except (MetadataError, NodeError):
                continue
            if now.clean:
                return True
            if now.client_id != holder.client_id or now.heartbeat != baseline[finding.index]:
                raise UserError(
                    f"storage {storage_name} is mounted by {who}; use -o force after a crash"
                )
    log.warning(
        "storage %s: %s stopped its heartbeat %.0f s ago or more; taking over",
        storage_name, who, options.holder_timeout,
    )
    return False


async def take_write_grants(storage_name: str, legs: list[MirrorLeg]) -> None:
    """The mount has decided to write (after `wait_for_holder`, before its
    first write): every leg's node takes its export's write grant over. A
    node then ends the connections of the client that held the grant (an
    old holder, frozen or cut off), waits for the requests they had
    started, and refuses their reconnects, so nothing that holder still
    has in flight or resends lands after this. A leg offline now takes the
    grant at its next connection. UserError if another mount took a grant
    meanwhile (two mounts forcing at once: both may end fenced)."""
    outcomes = await gather([lambda leg=leg: leg.node.take_write_grant() for leg in legs])
    for leg, (_, error) in zip(legs, outcomes, strict=True):
        if error is not None:
            raise UserError(
                f"storage {storage_name}: {leg}: another mount took the storage over "
                f"meanwhile ({error})"
            ) from error
