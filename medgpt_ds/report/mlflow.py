"""--report_to mlflow: an MLflow run in a file store under ``<logging dir>/mlruns`` by default
(``mlflow ui --backend-store-uri <logging dir>/mlruns``); MLFLOW_TRACKING_URI and
MLFLOW_EXPERIMENT_NAME in the environment send it elsewhere.
"""
from __future__ import annotations

import os
import re
from typing import Optional

from medgpt_ds.report import flatten

_NOT_ALLOWED = re.compile(r"[^\w\-. /:]")  # MLflow's allowed metric / param name characters


class MlflowBackend:
    def __init__(self, log_dir: str, run_name: str, config: Optional[dict] = None) -> None:
        import mlflow  # optional dependency: pip install 'medgpt-ds[mlflow]'

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # the file store is what works offline with nothing else installed; MLflow 3 asks for an opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = "file:" + os.path.abspath(os.path.join(log_dir, "mlruns"))
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "medgpt-ds"))
        self.run = mlflow.start_run(run_name=run_name)
        params = {_NOT_ALLOWED.sub("_", k): str(v)[:500] for k, v in flatten(config).items()}
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(items[i:i + 100]))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({_NOT_ALLOWED.sub("_", k): v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()
