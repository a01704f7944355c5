"""Follow a Ray job's logs to its end through connections that drop, printing each line once.

Why not the SDK's `tail_job_logs`: its websocket has no heartbeat, so a connection that dies
quietly (common behind `kubectl port-forward`) goes silent, and after an error there is no way
back in but to print the whole log again. Here the stream reconnects with backoff while the
job runs; the server replays the log from its start on every connection, so we count the
characters already printed and print only what lies beyond them; once the job has ended, the
rest comes from the complete log (`get_job_logs`).
"""
from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import TextIO

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class LogPrinter:
    """Prints a log that arrives as chunks of successive replays, each part exactly once."""

    def __init__(self, out: TextIO):
        self.out, self.printed = out, 0

    def replay_from_start(self) -> None:
        self._seen = 0

    def chunk(self, text: str) -> None:
        end = self._seen + len(text)
        if end > self.printed:
            self.out.write(text[self.printed - self._seen:])
            self.out.flush()
            self.printed = end
        self._seen = end

    def whole_log(self, text: str) -> None:
        self.replay_from_start()
        self.chunk(text)


async def _tail_once(address: str, headers: dict[str, str], job_id: str,
                     printer: LogPrinter, heartbeat_s: float) -> None:
    """One websocket connection, until the server closes it; raises when it breaks."""
    import aiohttp

    printer.replay_from_start()
    timeout = aiohttp.ClientTimeout(sock_connect=10)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        async with session.ws_connect(f"{address}/api/jobs/{job_id}/logs/tail",
                                      heartbeat=heartbeat_s) as ws:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    printer.chunk(msg.data)
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    raise ConnectionError(f"log stream broke: {ws.exception()}")
            if ws.close_code not in (None, aiohttp.WSCloseCode.OK):
                raise ConnectionError(f"log stream closed with code {ws.close_code}")


def follow(client, address: str, headers: dict[str, str], job_id: str, *,
           out: TextIO = sys.stdout, say: Callable[[str], None] = print,
           poll_s: float = 1.0, patience_s: float = 60.0, heartbeat_s: float = 10.0):
    """Stream the job's logs until it ends; return its final JobInfo, or None when the cluster
    stopped answering for `patience_s` (deleted, or the network went away for good)."""
    printer = LogPrinter(out)
    last_answer, delay = time.monotonic(), poll_s
    while True:
        try:
            asyncio.run(_tail_once(address, headers, job_id, printer, heartbeat_s))
            broke = None
        except Exception as exc:  # noqa: BLE001 - any break: ask the status, then reconnect
            broke = f"{type(exc).__name__}: {exc}"[:200]
        try:
            info = client.get_job_info(job_id)
        except Exception:  # noqa: BLE001 - unreachable for now
            info = None
        if info is not None:
            last_answer, status = time.monotonic(), getattr(info.status, "value", str(info.status))
            if status in TERMINAL:
                try:
                    printer.whole_log(client.get_job_logs(job_id))  # the part we did not see
                except Exception as exc:  # noqa: BLE001 - the outcome matters more
                    say(f"could not fetch the end of the logs ({type(exc).__name__})")
                return info
            delay = poll_s  # the cluster answers: reconnect soon
        elif time.monotonic() - last_answer > patience_s:
            return None
        if broke:
            say(f"log stream dropped ({broke}); reconnecting in {delay:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 15.0)
