"""The Flower ServerApp: read the run config, run :func:`server.federation.run_federation`.

``flwr run .`` loads the module-level ``app`` (config from ``[tool.flwr.app.config]``);
``ferry simulate`` builds one with :func:`build_server_app` around an already validated plan.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import FederationPlan, run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from simulations.runner import plan_simulation

    plan = plan_simulation(dict(context.run_config), num_clients=len(list(grid.get_node_ids())))
    run_federation(grid, plan)


def build_server_app(plan: FederationPlan) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, plan)

    return server_app
