"""The Flower ServerApp: read the run config, run :func:`server.federation.run_federation`.

``flwr run .`` loads the module-level ``app`` (config from ``[tool.flwr.app.config]``);
``ferry simulate`` builds one with :func:`build_server_app` around an already validated plan;
``ferry server`` submits a run whose config says ``mode = "deployment"``
(:mod:`server.deployment`: real institutions, no simulated data).
"""

from __future__ import annotations

from ferry.server.federation import FederationPlan, run_federation
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from ferry.server.deployment import is_deployment, plan_deployment

    run_config = dict(context.run_config)
    if is_deployment(run_config):
        plan = plan_deployment(run_config)
    else:
        from ferry.simulations.runner import plan_simulation

        plan = plan_simulation(run_config, num_clients=len(list(grid.get_node_ids())))
    run_federation(grid, plan)


def build_server_app(plan: FederationPlan) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, plan)

    return server_app
