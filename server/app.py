"""The Flower ServerApp: read the run config, run :func:`server.federation.run_federation`.

``flwr run .`` loads the module-level ``app`` (config from ``[tool.flwr.app.config]``; a
simulation's plan is :mod:`server.simulation_plan`);
``ferry simulate`` builds one with :func:`build_server_app` around an already validated plan;
``ferry server`` submits a run whose config says ``mode = "deployment"``
(:mod:`server.deployment`: real institutions, no simulated data).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ferry.server.deployment import is_deployment, plan_deployment
from ferry.server.federation import FederationPlan, run_federation
from ferry.server.simulation_plan import plan_simulation

app = ServerApp()
UNSET = ""  # a [tool.flwr.app.config] value left to the scenario's preset or the rule


def chosen_settings(run_config: dict) -> dict:
    """A ``flwr run`` config without its unset markers: what it leaves open is resolved
    as ``ferry simulate`` resolves it (:func:`server.simulation_plan.plan_simulation`)."""
    return {k: v for k, v in run_config.items() if v != UNSET}


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    if is_deployment(run_config):
        plan = plan_deployment(run_config)
    else:
        plan = plan_simulation(
            chosen_settings(run_config), num_clients=len(list(grid.get_node_ids()))
        )
    run_federation(grid, plan)


def build_server_app(plan: FederationPlan) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, plan)

    return server_app
