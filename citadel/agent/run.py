"""Process wiring for ``citadel agent``: the agent, SDS socket, admin port, signals."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

import grpc

from citadel.agent.agent import Agent, AgentConfig, GiveUp
from citadel.agent.health import start_admin_server
from citadel.agent.sds import SdsServicer, start_sds_server
from citadel.eventloop import stop_signals
from citadel.logs import get_logger

__all__ = ["RunningAgent", "run_agent", "run_once", "start_agent"]

_log = get_logger("citadel.agent")


async def run_once(config: AgentConfig) -> int:
    """Init-container mode: 0 once the set is written, 1 with a clear message otherwise."""
    agent = Agent(config)
    try:
        svid = await agent.fetch_once()
    except GiveUp as exc:
        _log.error("no certificate written", error=exc.message, out_dir=str(config.out_dir))
        return 1
    finally:
        await agent.close()
    _log.info("done", spiffe_id=str(svid.spiffe_id), out_dir=str(config.out_dir))
    return 0


@dataclass(slots=True)
class RunningAgent:
    """A started long-running agent (also what tests and the bench drive in-process)."""

    agent: Agent
    stop: asyncio.Event
    tasks: list[asyncio.Task[None]]
    sds_server: grpc.aio.Server | None = None
    sds: SdsServicer | None = None
    admin: asyncio.Server | None = None
    admin_port: int | None = None

    async def close(self) -> None:
        self.stop.set()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=5)
        if self.sds_server is not None:
            await self.sds_server.stop(grace=0.5)
        if self.admin is not None:
            self.admin.close()
            with contextlib.suppress(Exception):
                await self.admin.wait_closed()
        await self.agent.close()


async def start_agent(
    config: AgentConfig,
    *,
    sds_socket: Path | None = None,
    admin: tuple[str, int] | None = None,
    agent: Agent | None = None,
) -> RunningAgent:
    agent = agent or Agent(config)
    stop = asyncio.Event()
    running = RunningAgent(agent=agent, stop=stop, tasks=[])
    if sds_socket is not None:
        running.sds_server, running.sds = await start_sds_server(agent.store, sds_socket)
        _log.info("serving SDS", socket=str(sds_socket))
    if admin is not None:
        running.admin = await start_admin_server(agent.health, host=admin[0], port=admin[1])
        running.admin_port = running.admin.sockets[0].getsockname()[1]
        _log.info("admin endpoints", listen=f"{admin[0]}:{running.admin_port}")
    running.tasks = [
        asyncio.create_task(agent.renew_forever(stop), name="renew"),
        asyncio.create_task(agent.poll_bundle_forever(stop), name="bundle"),
    ]
    return running


async def run_agent(
    config: AgentConfig, *, sds_socket: Path | None, admin: tuple[str, int] | None
) -> int:
    _log.info(
        "starting",
        ca=config.ca_address,
        out_dir=str(config.out_dir),
        key_type=str(config.key_type),
        trust_domain=config.trust_domain.name,
        ttl_seconds=config.ttl_seconds,
    )
    running = await start_agent(config, sds_socket=sds_socket, admin=admin)
    async with stop_signals(running.stop, optional=True):  # absorbed while closing too
        await running.stop.wait()
        _log.info("stopping")
        await running.close()
    return 0
