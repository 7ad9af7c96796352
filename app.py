"""Entry point for ``panel serve app.py``: one dashboard (and simulation) per browser session."""

import panel as pn

from dynattn.dashboard import Dashboard

pn.extension()
Dashboard().template().servable()
