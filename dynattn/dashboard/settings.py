"""The page's simulation settings: an editable copy, and how an edit reaches the simulation.

The controls edit a private :class:`~dynattn.simulation.SimulationConfig` (the *form*); each
edit is then applied to the simulation inside a ``try``, so a setting the simulation rejects
leaves it untouched, resets the control and says why on the page. Typed fields are parsed and
checked here (a rejected value reverts the field), rebuilds and uploads run in the background,
and under a policy that picks its own threshold the threshold slider shows the live value.
"""

from __future__ import annotations

from ..simulation import REBUILD_PARAMS, SimulationConfig
from .controls import TYPED_FIELDS, code_edits, simulation_controls
from .text import POLICY_NOTES, escape, rejection

__all__ = ["SIM_CONTROLS", "SettingsEditor"]

#: Simulation settings shown as controls.
SIM_CONTROLS = (
    "policy",
    "threshold",
    "tolerance",
    "updates_per_tick",
    "queries_per_tick",
    "stream",
    "preset",
    "n",
    "d",
    "scale",
    "seed",
    "k_share",
    "delta_scale",
    "dtype",
)


class SettingsEditor:
    """The controls of one dashboard's simulation settings.

    Parameters
    ----------
    dash : Dashboard
        The view: its simulation, its messages (``_say``), background work
        (``_in_background``) and restart after a rebuild (``_restart_view``).

    Attributes
    ----------
    form : SimulationConfig
        What the controls show.
    controls : dict
        One widget per setting (:func:`~dynattn.dashboard.controls.simulation_controls`).
    """

    def __init__(self, dash):
        self.dash = dash
        values = dash.sim.config.param.values()
        self.form = SimulationConfig(**{k: values[k] for k in SIM_CONTROLS})
        self.controls = simulation_controls(self.form)
        self.has_file = False
        self._syncing = False
        watched = [k for k in SIM_CONTROLS if k not in TYPED_FIELDS]
        self.form.param.watch(self._on_edit, watched)
        self.form.param.watch(self.show_policy, "policy")
        for name in TYPED_FIELDS:
            self.controls[name].param.watch(self._on_typed, "value")

    # ------------------------------------------------------------------ edits
    def _on_edit(self, *events) -> None:
        if not self._syncing:
            self.apply({e.name: e.new for e in events})

    def _on_typed(self, event) -> None:
        """A typed seed or update size: applied if valid, else reverted with the reason."""
        if self._syncing:
            return
        name = next(k for k in TYPED_FIELDS if self.controls[k] is event.obj)
        label, integer = TYPED_FIELDS[name]
        parameter = self.form.param[name]
        try:
            number = float(event.new)
            if integer and number != int(number):
                raise ValueError(event.new)
            self.form.param.update({name: int(number) if integer else number})
        except (ValueError, OverflowError):
            self.sync()
            exclusive = getattr(parameter, "inclusive_bounds", (True, True))[0] is False
            self.dash._say(
                rejection(label, event.new, parameter.bounds, integer, exclusive)
                + f" The previous value {getattr(self.form, name):g} is kept."
            )
            return
        self.apply({name: getattr(self.form, name)})

    def apply(self, changes: dict) -> None:
        """Apply edited settings; on failure restore the controls and explain.

        A new threshold under a policy that picks its own switches to *fixed* at that value.
        A rebuild (n, d, preset, ...) runs in the background.
        """
        dash = self.dash
        if dash._busy:
            self.sync()
            dash._say(f"Please wait: {dash._busy} …", "info")
            return
        if "threshold" in changes and self.form.policy != "fixed":
            changes["policy"] = "fixed"
            self.set(policy="fixed")
        if changes.get("preset") == "file" and not self.has_file:
            self.sync()
            dash._say(
                "To use your own Q, K, V, upload a .npz file with arrays Q, K and V (each "
                "n×d) below; until then the previous preset is kept."
            )
            return
        if changes.keys() & set(REBUILD_PARAMS):
            n, d = changes.get("n", self.form.n), changes.get("d", self.form.d)
            dash._in_background(
                f"Building Q, K, V for n = {n:,}, d = {d}",
                lambda: dash.sim.config.param.update(**changes),
                self._rebuilt,
            )
            return

        def applied(_, error):
            if error is not None:
                self.sync()
                shown = escape(", ".join(f"{k} = {v!r}" for k, v in changes.items()))
                dash._say(
                    f"Could not apply {shown}: {escape(error)}. The previous settings are kept."
                )
                return
            dash._player.pacer.forget()
            dash._clear_alert()

        # from the next tick; off the event loop, as the tick running now may take a while
        dash._loop.off_loop(lambda: dash.sim.config.param.update(**changes), applied)

    def _rebuilt(self, error) -> None:
        dash = self.dash
        if error is not None:
            self.sync()
            dash._say(f"Could not rebuild: {escape(error)}. The previous settings are kept.")
            return
        dash._restart_view()
        if dash.playing:
            eng = dash.sim.engine
            dash._say(
                f"Rebuilt Q, K, V for n = {eng.n:,}, d = {eng.d}; the run restarted at tick 0 "
                "and keeps playing.",
                "info",
            )

    def upload(self, filename: str | None, data: bytes) -> None:
        """Use an uploaded ``.npz`` (in the background); its name is shown escaped."""
        dash = self.dash
        name = escape(filename or "the file")

        def done(error):
            if error is not None:
                dash._say(f"Could not use {name}: {escape(error)}. The previous Q, K, V are kept.")
                return
            self.has_file = True
            dash._restart_view()
            eng = dash.sim.engine
            dash._say(
                f"Loaded {name}: n = {eng.n:,}, d = {eng.d}. The run restarted at tick 0.",
                "success",
            )

        dash._in_background(f"Loading {name}", lambda: dash.sim.load_npz(data), done)

    # ------------------------------------------------------------------ showing
    def set(self, **values) -> None:
        """Show ``values`` in the controls without applying them."""
        with code_edits(self):
            self.form.param.update(**values)
            for name in TYPED_FIELDS:
                self.controls[name].value = f"{getattr(self.form, name):g}"

    def sync(self) -> None:
        """Show the simulation's current settings."""
        values = self.dash.sim.config.param.values()
        self.set(**{k: values[k] for k in SIM_CONTROLS})

    def show_policy(self, *events) -> None:
        policy = self.form.policy
        self.controls["tolerance"].visible = policy == "error"
        self.dash.policy_note.object = POLICY_NOTES[policy]
        self.controls["threshold"].label = (
            "threshold (pending updates)" if policy == "fixed" else "threshold (live)"
        )

    def follow_threshold(self, threshold: float) -> None:
        """Under a policy that picks its own threshold, the slider shows the one in force."""
        if self.form.policy == "fixed":
            return
        low, high = self.form.param.threshold.bounds
        value = int(min(max(threshold, low), high)) if threshold == threshold else low
        if self.form.threshold != value:
            self.set(threshold=value)
        # short enough for the sidebar with the slider's value after it
        self.controls["threshold"].label = (
            "threshold (live: never flush)" if threshold > high else "threshold (live)"
        )
