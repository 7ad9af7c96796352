"""Entry point for ``panel serve app.py``: one page per browser session, with two sources:
the synthetic dashboard (its lessons open first) and the Text source (a real model's attention
over your text; ``?source=Text`` opens it directly)."""

import panel as pn

from dynattn.dashboard.page import app_page

pn.extension()
app_page().servable()
