"""A TCP proxy that makes a local store feel remote: every client->server chunk waits `delay_s`.

A store in another availability zone, or a managed database, costs a network round trip per
request however fast the server itself is. Delaying what the client sends (not what it receives)
makes every round trip cost at least `delay_s` while a pipelined stream of chunks still flows at
full speed (each chunk is due `delay_s` after it arrived, not after the previous one left).

It counts what crossed it, so a benchmark can say how many round trips a workload made:
- `requests`: client->server chunks (one per socket read; a large INSERT may take several);
- `round_trips`: client->server bursts, i.e. chunks sent after the server last answered (the
  first chunk of a connection counts too): what a client waits on, one per query/commit;
- `connections` accepted, and bytes each way.

    with DelayProxy("127.0.0.1", 5432, delay_s=0.025) as proxy:
        url = f"postgresql://user@127.0.0.1:{proxy.port}/db"

The proxy runs its own asyncio loop in a daemon thread of the caller's process; `stop()` closes
the listener and every open connection and joins the thread.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import asdict, dataclass

_CHUNK = 64 * 1024
_STOP_TIMEOUT_S = 10.0


@dataclass
class ProxyCounts:
    requests: int = 0
    round_trips: int = 0
    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class DelayProxy:
    def __init__(self, target_host: str, target_port: int, delay_s: float = 0.025, listen_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.delay_s = delay_s
        self.listen_host = listen_host
        self.port: int | None = None
        self._counts = ProxyCounts()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # control (any thread) ----------------------------------------------------------------------

    def start(self) -> DelayProxy:
        self._thread = threading.Thread(target=self._serve_forever, name="delay-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(_STOP_TIMEOUT_S) or self._error is not None:
            self.stop()
            raise RuntimeError(f"the delay proxy did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None:
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:  # the loop already finished
                pass
        self._thread.join(_STOP_TIMEOUT_S)
        if self._thread.is_alive():
            raise RuntimeError("the delay proxy thread did not stop")
        self._thread = None

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def counts(self) -> ProxyCounts:
        with self._lock:
            return ProxyCounts(**self._counts.as_dict())

    def reset_counts(self) -> ProxyCounts:
        """The counts so far, then zero."""
        with self._lock:
            before, self._counts = self._counts, ProxyCounts()
        return before

    def _add(self, **amounts: int) -> None:
        with self._lock:
            for name, n in amounts.items():
                setattr(self._counts, name, getattr(self._counts, name) + n)

    # the proxy's own thread --------------------------------------------------------------------

    def _serve_forever(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported by start(); the thread must not die silently
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        handlers: set[asyncio.Task] = set()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            handlers.add(task)
            try:
                await self._relay(reader, writer)
            except asyncio.CancelledError:
                pass  # stop(): end quietly (a cancelled connection task trips asyncio's stream callback in 3.11)
            finally:
                handlers.discard(task)

        server = await asyncio.start_server(on_connect, self.listen_host, 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stopping.wait()
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._add(connections=1)
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        loop = asyncio.get_running_loop()
        due: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        server_answered = [True]  # the first chunk of a connection starts a round trip

        async def read_up() -> None:
            while data := await client_reader.read(_CHUNK):
                trip = server_answered[0]
                server_answered[0] = False
                self._add(requests=1, round_trips=int(trip), bytes_up=len(data))
                due.put_nowait((loop.time() + self.delay_s, data))
            due.put_nowait(None)

        async def send_up() -> None:
            while (item := await due.get()) is not None:
                at, data = item
                await asyncio.sleep(max(0.0, at - loop.time()))
                server_writer.write(data)
                await server_writer.drain()
            if server_writer.can_write_eof():
                server_writer.write_eof()

        async def pipe_down() -> None:
            while data := await server_reader.read(_CHUNK):
                server_answered[0] = True
                self._add(bytes_down=len(data))
                client_writer.write(data)
                await client_writer.drain()

        up = asyncio.gather(read_up(), send_up())
        down = asyncio.ensure_future(pipe_down())
        try:
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if up in done and not down.done():
                # The client hung up and its EOF was forwarded: let the server finish and close.
                await asyncio.wait({down}, timeout=5.0)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            for writer in (server_writer, client_writer):
                writer.close()
            for writer in (server_writer, client_writer):
                try:
                    await writer.wait_closed()
                except (OSError, asyncio.CancelledError):
                    pass
