"""One browser session's clock: periodic frames, clean-up when the tab closes, slow work
off the event loop.

Panel runs every session's callbacks on one event loop; a callback that computes for a second
holds up every visitor. :class:`SessionLoop` owns the session's one periodic callback, starts
it only once the page has loaded, stops it as soon as the tab has gone (Bokeh discards a
closed session only later), and runs model work (a frame's ticks, a rebuild, an upload, a
flush) in threads, one at a time, publishing the results back on the event loop: at the
largest sizes a single flush or query batch takes over half a second, and a click must not
wait for it.

Why nothing may run before the page has loaded: until the browser reports its document ready,
Panel counts the session as not connected, and both HoloViews (a plot refresh after a stream
send) and Panel (a periodic callback's start) then reschedule themselves on the next tick,
under the session's document lock, again and again until it connects. A tab closed before it
reports ready (a slow page on a busy machine) never connects: those callbacks circulate
forever, the lock is never free, and Bokeh never discards the session nor frees its memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import panel as pn
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError

__all__ = ["SessionLoop", "ignore_writes_to_closed_tabs"]


def ignore_writes_to_closed_tabs(loop: asyncio.AbstractEventLoop) -> None:
    """Keep the server log free of tracebacks for messages sent to a tab that just closed.

    A frame rendered while its tab closes leaves write tasks failing with
    ``WebSocketClosedError``; Panel cancels them when it destroys the document, which does not
    retrieve an exception already set, so asyncio logs "Task exception was never retrieved"
    with a traceback. Nothing is lost (the tab is gone); every other exception still reaches
    the previous handler. Installed once per event loop.
    """
    previous = loop.get_exception_handler()
    if getattr(previous, "ignores_closed_tabs", False):
        return

    def handler(loop, context):
        if isinstance(context.get("exception"), (WebSocketClosedError, StreamClosedError)):
            return
        if previous is None:
            loop.default_exception_handler(context)
        else:
            previous(loop, context)

    handler.ignores_closed_tabs = True
    loop.set_exception_handler(handler)


class SessionLoop:
    """The periodic callback of one session, and its background work.

    Parameters
    ----------
    frame : callable
        Called every ``period`` milliseconds while running.
    period : int
    on_destroyed : callable (session_context) -> None
        Called when Bokeh destroys the session (not outside a server).
    on_loaded : callable () -> None
        Called once the page has loaded (in a server; outside one, ``loaded`` is True at once
        and this is never called).

    Attributes
    ----------
    callback : panel.io.callbacks.PeriodicCallback
    busy : str or None
        What a background thread is doing, if anything (frames should pause meanwhile).
    lock : threading.RLock
        Held by every piece of model work of this session (see :meth:`off_loop`); code on the
        event loop that reads or changes the model takes it too.
    loaded : bool
        Whether the page has loaded: until then the view must not send to its streams, and
        ``start`` waits for it (see the module's docstring).
    """

    def __init__(self, frame, period: int, on_destroyed, on_loaded):
        self.callback = pn.state.add_periodic_callback(frame, period=period, start=False)
        self.doc = pn.state.curdoc
        self.context = self.doc.session_context if self.doc else None
        self.busy: str | None = None
        self.lock = threading.RLock()
        self.loaded = self.context is None
        self._start_on_load = False  # started before the page loaded
        self._on_loaded = on_loaded
        self._was_connected = False
        self._closed = False  # the session was destroyed: its document takes no more callbacks
        self._closing = threading.Lock()
        if self.context is not None:  # outside a server there is no session to clean up
            pn.state.on_session_destroyed(self._destroyed)
            self._on_destroyed = on_destroyed
            pn.state.onload(self._load)
            ignore_writes_to_closed_tabs(asyncio.get_event_loop())

    def _destroyed(self, session_context) -> None:
        with self._closing:
            self._closed = True
        self._on_destroyed(session_context)

    def _load(self) -> None:
        self.loaded = True
        self._on_loaded()
        if self._start_on_load:
            self.start(self.callback.period)

    @property
    def served(self) -> bool:
        """Whether this runs in a server session (not a notebook or a test)."""
        return self.context is not None

    def start(self, period: int) -> None:
        """Run frames every ``period`` ms (from when the page has loaded)."""
        self.callback.period = period
        if not self.loaded:
            self._start_on_load = True
            return
        if not self.callback.running:
            self.callback.start()

    def stop(self) -> None:
        self._start_on_load = False
        self.callback.stop()

    def soon(self, callback) -> None:
        """Call ``callback()`` on the event loop's next turn, after what is being sent now
        (outside a server: at once)."""
        if self.served:
            self.doc.add_next_tick_callback(callback)
        else:
            callback()

    def orphaned(self) -> bool:
        """Whether the session lost its browser tab: it had a connection and has none left (a
        page still loading has not connected yet and is not orphaned)."""
        if self.context is None:
            return False
        sessions = self.context.server_context.sessions
        mine = next((s for s in sessions if s.id == self.context.id), None)
        connections = 0 if mine is None else mine.connection_count
        self._was_connected = self._was_connected or connections > 0
        return self._was_connected and connections == 0

    def in_background(self, what: str, work, done) -> None:
        """Run ``work()`` off the event loop (see :meth:`off_loop`), then ``done(error)`` on
        it (``error`` None or the exception ``work`` raised); ``busy`` says ``what``
        meanwhile."""

        def finish(result, error):
            self.busy = None
            done(error)

        self.busy = what if self.served else None
        self.off_loop(work, finish)

    def off_loop(self, work, done) -> None:
        """Run ``work()`` in a thread holding :attr:`lock`, then ``done(result, error)`` on the
        event loop (one of them None). Outside a server both run at once, in order.

        Every change to the session's model runs under :attr:`lock` (a frame's ticks, a
        flush, a rebuild, a setting applied), so they never interleave; the event loop itself
        never waits for model work and answers clicks at once.
        """
        if not self.served:
            result, error = _call(work)
            done(result, error)
            return
        doc = self.doc

        def target():
            with self.lock:
                result, error = _call(work)
            # A callback added to a destroyed session's document never runs, and it would
            # keep this session's objects alive for as long as Bokeh's global state holds
            # that document. Added before the session is destroyed, it is dropped with it.
            with self._closing, contextlib.suppress(Exception):
                if not self._closed:
                    doc.add_next_tick_callback(lambda: done(result, error))

        threading.Thread(target=target, name="dynattn-session", daemon=True).start()


def _call(work):
    """``(work(), None)``, or ``(None, exception)`` if it raised."""
    try:
        return work(), None
    except Exception as exc:
        return None, exc
